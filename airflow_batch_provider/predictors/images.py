"""Image classification and image embeddings with Hugging Face transformers vision models.

Two predictors share one engine (:class:`_ImagePredictor`):

* :class:`ImageClassifier`: ``labels`` and ``scores`` per row, the model's ``top_k`` classes
  (``AutoModelForImageClassification``: ViT, ConvNeXt, ResNet, Swin, ...), best first.
* :class:`ImageEmbedder`: one ``embedding`` vector per row (``AutoModel``: CLIP/SigLIP image
  features, DINOv2, ViT, ...).

The input column holds, per row, one of: the image's bytes (a binary column); a string that
is a local path, a ``file://`` or an ``s3://`` URL (read through fsspec with the job's own
storage credentials, which the runner hands over through ``use_storage_options``); or a
``{"bytes", "path"}`` struct (how Hugging Face datasets store images in Parquet).

Reading and decoding run on a thread pool beside the model: a batch is cut into chunks of
``model_batch_size`` images, and while the model runs on one chunk the pool reads, decodes
and resizes the next ones (PIL releases the GIL while it decodes and resizes). A row whose
image cannot be read (missing file, not an image, truncated) fails alone: the predictor
raises :class:`~airflow_batch_provider.core.errors.RowsFailed` naming it, with the output of
the other rows, so the job's ``bad_rows`` policy rejects or fails that row, never the whole
batch. A store that cannot be reached at all (connection refused, access denied) is no row's
fault: :class:`~airflow_batch_provider.core.errors.PredictorUnavailableError` fails the shard,
and its retry reads again. A null input gives null outputs.
"""

from __future__ import annotations

import importlib.util
import io
import os
import posixpath
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from airflow_batch_provider.core import tunables
from airflow_batch_provider.core.errors import PredictorError, PredictorUnavailableError, RowsFailed
from airflow_batch_provider.core.stores.urls import is_remote, local_path_of, protocol_of
from airflow_batch_provider.predictors.openai_compatible import arrow_column, column_values

DTYPES = ("float32", "float16", "bfloat16")
POOLINGS = ("auto", "pooler", "cls", "mean")
#: read errors that are the row's own (its path is wrong): the row is bad, the store is fine
_ROW_READ_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


class BadImage(Exception):
    """One row's image cannot be read or decoded (the message says which and what to do)."""


class _ImagePredictor:
    """What classification and embedding share: the input column, reading and decoding on
    threads, the model's device and dtype, and the per-row failures."""

    auto_class = "AutoModel"

    def __init__(
        self,
        model: str,
        image_column: str,
        keep_columns: list[str] | None,
        root: str | None,
        device: str | None,
        dtype: str | None,
        model_batch_size: int | None,
        decode_threads: int | None,
        storage_options: dict[str, Any] | None,
    ):
        if not model or not isinstance(model, str):
            raise PredictorError(f"{type(self).__name__}: model must be a model directory or name, got {model!r}")
        if dtype is not None and dtype not in DTYPES:
            raise PredictorError(f"{type(self).__name__}: dtype={dtype!r}; use one of {DTYPES}")
        self.model_batch_size = int(model_batch_size or tunables.IMAGE_MODEL_BATCH)
        self.decode_threads = int(decode_threads or tunables.IMAGE_DECODE_THREADS)
        if self.model_batch_size < 1 or self.decode_threads < 1:
            raise PredictorError(
                f"{type(self).__name__}: model_batch_size={model_batch_size} and decode_threads={decode_threads} "
                "must be at least 1"
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoImageProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a replica's log is per shard: no weight-loading bars in it
        self.torch = torch
        self.image_column = image_column
        self.keep_columns = list(keep_columns) if keep_columns is not None else ["id"]
        self.root = root
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or ("float16" if self.device.startswith("cuda") else "float32")
        # PIL's processors decode and resize on the pool's threads; torchvision (where it is
        # installed) brings its own, the default then
        backend = {} if importlib.util.find_spec("torchvision") else {"backend": "pil"}
        self.processor = AutoImageProcessor.from_pretrained(model, **backend)
        self.model, self.loading_info = self._load_model(model)
        self._extra_storage_options = dict(storage_options or {})
        self._storage_options: dict[str, Any] = dict(self._extra_storage_options)
        self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="abp-decode")

    def _load_model(self, model: str) -> tuple[Any, dict[str, Any]]:
        import transformers

        loader = getattr(transformers, self.auto_class)
        loaded, info = loader.from_pretrained(model, dtype=getattr(self.torch, self.dtype), output_loading_info=True)
        return loaded.to(self.device).eval(), info

    def use_storage_options(self, options: dict[str, Any] | None) -> None:
        """The job's s3fs-style options (the runner's, each run); ``storage_options`` given to
        the predictor win over them key by key."""
        self._storage_options = {**(options or {}), **self._extra_storage_options}

    # -- the batch -----------------------------------------------------------------------------
    def __call__(self, batch: Any) -> pa.Table:
        names = batch.column_names if isinstance(batch, pa.Table) else list(batch.keys()) if isinstance(batch, dict) else list(batch.columns)
        missing = [c for c in [self.image_column, *self.keep_columns] if c not in names]
        if missing:
            raise PredictorError(
                f"{type(self).__name__}: column(s) {missing} are not in the input batch (it has {sorted(names)}); "
                "set image_column / keep_columns (keep_columns=[] keeps none), or BatchSpec.columns"
            )
        values = column_values(batch, self.image_column)
        rows = len(values)
        present = [i for i, v in enumerate(values) if not _is_null(v)]
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        step = self.model_batch_size
        chunks = [present[k:k + step] for k in range(0, len(present), step)]
        queued: list[list[tuple[int, Future]]] = []
        try:
            for index in range(len(chunks)):
                # keep IMAGE_DECODE_AHEAD chunks decoding behind the one the model takes next
                while len(queued) <= tunables.IMAGE_DECODE_AHEAD and index + len(queued) < len(chunks):
                    queued.append([(i, self._pool.submit(self._pixels, values[i])) for i in chunks[index + len(queued)]])
                decoded, rows_ok = [], []
                for i, future in queued.pop(0):
                    try:
                        decoded.append(future.result())
                        rows_ok.append(i)
                    except BadImage as err:
                        failures[i] = str(err)
                shapes: dict[tuple[int, ...], list[int]] = {}
                for position, pixels in enumerate(decoded):  # one forward pass per input size
                    shapes.setdefault(pixels.shape, []).append(position)
                for positions in shapes.values():
                    answers = self._infer(np.stack([decoded[p] for p in positions]))
                    for p, answer in zip(positions, answers, strict=True):
                        results[rows_ok[p]] = answer
        finally:
            for chunk in queued:  # a raise above: do not decode what nobody will take
                for _, future in chunk:
                    future.cancel()
        kept = [i for i in range(rows) if i not in failures]
        columns: dict[str, Any] = {}
        take = pa.array(kept, type=pa.int64())
        for name in self.keep_columns:
            columns[name] = arrow_column(batch, name).take(take)
        columns.update(self._columns([results.get(i) for i in kept]))
        table = pa.table(columns)
        if failures:
            raise RowsFailed(failures, output=table)
        return table

    def _infer(self, pixels: np.ndarray) -> list[Any]:
        raise NotImplementedError

    def _columns(self, answers: list[Any]) -> dict[str, pa.Array]:
        """The output columns for ``answers`` (None for a null input), in order."""
        raise NotImplementedError

    # -- one image, on a pool thread -------------------------------------------------------------
    def _pixels(self, value: Any) -> np.ndarray:
        """The model's input for one row: read, decode, convert to RGB, resize and normalise."""
        data, where = self._read(value)
        try:
            from PIL import Image, ImageOps

            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened).convert("RGB")
        except Exception as err:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError...)
            detail = "no image format PIL knows" if type(err).__name__ == "UnidentifiedImageError" else (
                f"{type(err).__name__}: {err}")
            raise BadImage(
                f"column {self.image_column!r}: cannot decode {where} as an image ({detail}); "
                "replace it with a PNG/JPEG/WebP/... file, or set the row's value to null to skip it"
            ) from None
        try:
            return self.processor(images=image, return_tensors="np")["pixel_values"][0]
        except Exception as err:  # e.g. an image of 0 or 1 pixel the resize cannot take
            raise BadImage(
                f"column {self.image_column!r}: the model's image processor cannot take {where} "
                f"({image.width}x{image.height} pixels; {type(err).__name__}: {err}); replace the image, or set the "
                "row's value to null to skip it"
            ) from None

    def _read(self, value: Any) -> tuple[bytes, str]:
        """The row's image bytes and how to name them in an error."""
        if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
            if value is None:
                raise BadImage(f"column {self.image_column!r}: the struct has neither 'bytes' nor 'path'")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value), f"the row's image bytes ({len(value)} bytes)"
        if not isinstance(value, str):
            raise BadImage(
                f"column {self.image_column!r} holds a {type(value).__name__}; it must hold image bytes, or a local "
                "path, file:// or s3:// URL"
            )
        if not value.strip():
            raise BadImage(f"column {self.image_column!r} holds an empty path; give a path or URL, or null to skip the row")
        url = self._resolve(value)
        protocol = protocol_of(url)
        if protocol not in ("file", "s3"):
            raise BadImage(f"column {self.image_column!r}: {value!r} is a {protocol}:// URL; use a local path, file:// or s3://")
        import fsspec

        try:
            if protocol == "s3":
                fs = fsspec.filesystem("s3", **self._storage_options)
                return fs.cat_file(url.split("://", 1)[1]), url
            return fsspec.filesystem("file").cat_file(local_path_of(url)), url
        except _ROW_READ_ERRORS:
            raise BadImage(
                f"column {self.image_column!r}: no image at {url} (no such file); fix the row's path or put the "
                "image there, or set the row's value to null to skip it"
            ) from None
        except Exception as err:
            raise PredictorUnavailableError(
                f"{type(self).__name__} cannot read {url} ({type(err).__name__}: {err}); no row is at fault: "
                "check the store is reachable and that the job's storage connection may read it"
            ) from None

    def _resolve(self, value: str) -> str:
        if self.root is None or "://" in value or os.path.isabs(value):
            return value
        if is_remote(self.root):
            return posixpath.join(self.root, value)
        return os.path.join(local_path_of(self.root), value)


class ImageClassifier(_ImagePredictor):
    """The ``top_k`` classes of each row's image: ``labels`` (the model's ``id2label`` names)
    and ``scores`` (softmax probabilities; sigmoid for a multi-label model), best first.

    :param model: a transformers image-classification model: a directory or a name in the
        local Hugging Face cache (the replicas do not download).
    :param image_column: the column with the images (bytes, paths or URLs; see the module).
    :param keep_columns: input columns copied to the output (e.g. the row id).
    :param top_k: classes kept per row (at most the model's number of classes).
    :param root: a directory or ``s3://`` prefix that relative paths in ``image_column`` are under.
    :param device: ``cuda``, ``cpu``...; default CUDA when Ray gave this replica a GPU.
    :param dtype: the weights' dtype: ``float32``, ``float16``, ``bfloat16``; default float16 on
        CUDA, float32 on CPU. Scores are computed in float32 either way.
    :param model_batch_size: images per forward pass (default ``IMAGE_MODEL_BATCH``).
    :param decode_threads: threads reading and decoding images (default ``IMAGE_DECODE_THREADS``).
    :param storage_options: more s3fs options for reading images (``{"anon": True}`` for a
        public bucket); credentials come from the job's storage connection instead.
    """

    auto_class = "AutoModelForImageClassification"

    def __init__(
        self,
        model: str,
        image_column: str = "image",
        keep_columns: list[str] | None = None,
        top_k: int = 5,
        root: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        model_batch_size: int | None = None,
        decode_threads: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ):
        if int(top_k) < 1:
            raise PredictorError(f"ImageClassifier: top_k={top_k} must be at least 1")
        super().__init__(model, image_column, keep_columns, root, device, dtype, model_batch_size, decode_threads,
                         storage_options)
        config = self.model.config
        self.top_k = min(int(top_k), int(config.num_labels))
        self.id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"

    def _infer(self, pixels: np.ndarray) -> list[tuple[list[str], list[float]]]:
        torch = self.torch
        with torch.inference_mode():
            logits = self.model(pixel_values=torch.from_numpy(pixels).to(self.device, getattr(torch, self.dtype))).logits
            probs = logits.float().sigmoid() if self.multi_label else logits.float().softmax(dim=-1)
            scores, ids = probs.topk(self.top_k, dim=-1)
        return [
            ([self.id2label.get(i, str(i)) for i in row_ids], row_scores)
            for row_ids, row_scores in zip(ids.cpu().tolist(), scores.cpu().tolist(), strict=True)
        ]

    def _columns(self, answers):
        return {
            "labels": pa.array([None if a is None else a[0] for a in answers], pa.list_(pa.string())),
            "scores": pa.array([None if a is None else a[1] for a in answers], pa.list_(pa.float32())),
        }


class ImageEmbedder(_ImagePredictor):
    """One ``embedding`` vector per row's image (a fixed-size float32 list column).

    The vector is the model's image features where it has them (CLIP, SigLIP:
    ``get_image_features``), else per ``pooling``: ``"pooler"`` (the model's pooled output),
    ``"cls"`` (the first token's last hidden state), ``"mean"`` (the mean over tokens or, for
    a convolutional model, over positions); ``"auto"`` takes the pooled output when the
    checkpoint has its weights, else the first token (a pooler the checkpoint lacks would be
    random weights, a different vector on every replica).

    :param model: a transformers vision model: a directory or a name in the local cache.
    :param output_column: the name of the vector column.
    :param normalize: L2-normalise the vectors (cosine similarity = dot product).
    :param pooling: ``"auto"``, ``"pooler"``, ``"cls"`` or ``"mean"`` (see above).

    The other parameters are :class:`ImageClassifier`'s.
    """

    auto_class = "AutoModel"

    def __init__(
        self,
        model: str,
        image_column: str = "image",
        keep_columns: list[str] | None = None,
        output_column: str = "embedding",
        normalize: bool = True,
        pooling: str = "auto",
        root: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        model_batch_size: int | None = None,
        decode_threads: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ):
        if pooling not in POOLINGS:
            raise PredictorError(f"ImageEmbedder: pooling={pooling!r}; use one of {POOLINGS}")
        super().__init__(model, image_column, keep_columns, root, device, dtype, model_batch_size, decode_threads,
                         storage_options)
        self.output_column = output_column
        self.normalize = normalize
        self.features = callable(getattr(self.model, "get_image_features", None))
        pooler_missing = any(str(k).split(".")[0] == "pooler" for k in self.loading_info.get("missing_keys", ()))
        if pooling == "pooler" and pooler_missing:
            raise PredictorError(
                f"ImageEmbedder: pooling='pooler' but {model!r} has no pooler weights (they would be random); "
                "use pooling='cls' or 'mean'"
            )
        self.pooling = ("cls" if pooler_missing else "pooler") if pooling == "auto" else pooling
        self.width: int | None = None

    def _infer(self, pixels: np.ndarray) -> list[np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            given = torch.from_numpy(pixels).to(self.device, getattr(torch, self.dtype))
            if self.features:
                out = self.model.get_image_features(pixel_values=given)
                vectors = out if isinstance(out, torch.Tensor) else out.pooler_output
            else:
                vectors = self._pool_output(self.model(pixel_values=given))
            vectors = vectors.float().flatten(1)
            if self.normalize:
                vectors = torch.nn.functional.normalize(vectors, dim=-1)
        array = vectors.cpu().numpy()
        self.width = array.shape[1]
        return list(array)

    def _pool_output(self, output: Any) -> Any:
        pooled = getattr(output, "pooler_output", None)
        if self.pooling == "pooler":
            if pooled is None:
                raise PredictorError("ImageEmbedder: the model gives no pooled output; use pooling='cls' or 'mean'")
            return pooled
        hidden = output.last_hidden_state
        if hidden.dim() == 4:  # a convolutional model: (batch, channels, height, width)
            if self.pooling == "cls":
                return pooled if pooled is not None else hidden.mean(dim=(2, 3))
            return hidden.mean(dim=(2, 3))
        return hidden[:, 0] if self.pooling == "cls" else hidden.mean(dim=1)

    def _columns(self, answers):
        valid = np.array([a is not None for a in answers], dtype=bool)
        width = self.width if self.width is not None else self._probe_width()
        flat = np.zeros((len(answers), width), dtype=np.float32)
        if valid.any():
            flat[valid] = np.stack([a for a in answers if a is not None])
        return {
            self.output_column: pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width, mask=pa.array(~valid))
        }

    def _probe_width(self) -> int:
        """The vector width before any image was seen (a batch of nulls only): one blank image."""
        size = self.processor(images=np.zeros((8, 8, 3), dtype=np.uint8), return_tensors="np")["pixel_values"]
        return int(self._infer(size)[0].shape[0])


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or type(value).__name__ in ("NAType", "NaTType")
