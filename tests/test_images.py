"""The image predictors on a tiny random-weight ViT built in the test, over images PIL makes here.

Batches go through the provider's own conversions (``to_batch`` / ``from_batch``), so each
batch format is what a replica would hand the predictor. What the predictor answers is checked
against the model run by hand on the same image (transformers' processor and a forward pass),
so the threads, chunks and input forms change nothing a user would see.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_batch_provider.core.errors import PredictorError, PredictorUnavailableError, RowsFailed
from airflow_batch_provider.core.execution.batches import from_batch, to_batch
from airflow_batch_provider.predictors.images import ImageClassifier, ImageEmbedder
from tests.helpers import make_spec, put, read_sink, run_all, sink_table, spec_on
from tests.tiny_vision import HIDDEN, LABELS, NOT_AN_IMAGE, build_tiny_resnet, build_tiny_vit, image_bytes, truncated_png


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vit")
    return {kind: build_tiny_vit(root / kind, kind=kind) for kind in ("classifier", "embedder")}


def run(predictor, source: pa.Table, batch_format: str = "numpy") -> pa.Table:
    return from_batch(predictor(to_batch(source, batch_format)), batch_format)


def by_hand(model_dir: str, data: bytes, *, kind: str = "classifier") -> np.ndarray:
    """The model's answer for one image, without the predictor: class probabilities or the pooled vector."""
    import io

    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    pixels = processor(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        if kind == "classifier":
            return AutoModelForImageClassification.from_pretrained(model_dir)(pixel_values=pixels).logits.softmax(-1)[0].numpy()
        vector = AutoModel.from_pretrained(model_dir)(pixel_values=pixels).pooler_output[0]
        return torch.nn.functional.normalize(vector, dim=-1).numpy()


@pytest.mark.parametrize("batch_format", ["numpy", "pandas", "pyarrow"])
def test_classifier_on_image_bytes_in_every_batch_format(models, batch_format):
    images = [image_bytes(1), None, image_bytes(2, "JPEG"), image_bytes(3, "WEBP")]
    out = run(ImageClassifier(models["classifier"], top_k=3), pa.table({"id": [10, 11, 12, 13], "image": images}), batch_format)
    assert out.column_names == ["id", "labels", "scores"]
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == [10, 11, 12, 13]
    assert rows[1] == {"id": 11, "labels": None, "scores": None}  # a null image: null answers, not a bad row
    for data, row in zip(images, rows, strict=True):
        if data is None:
            continue
        probs = by_hand(models["classifier"], data)
        best = np.argsort(-probs)[:3]
        assert row["labels"] == [LABELS[i] for i in best]
        np.testing.assert_allclose(row["scores"], probs[best], rtol=1e-5)


def test_paths_urls_and_root_read_the_same_images(models, tmp_path):
    files = {}
    for i, fmt in enumerate(["PNG", "JPEG", "PNG"]):
        files[i] = image_bytes(i, fmt)
        (tmp_path / f"img{i}.{fmt.lower()}").write_bytes(files[i])
    paths = [str(tmp_path / "img0.png"), f"file://{tmp_path}/img1.jpeg", "img2.png"]  # the last under root
    classifier = ImageClassifier(models["classifier"], top_k=2, root=str(tmp_path), keep_columns=[])
    from_paths = run(classifier, pa.table({"image": paths}))
    from_bytes = run(classifier, pa.table({"image": [files[0], files[1], files[2]]}))
    assert from_paths.to_pylist() == from_bytes.to_pylist()
    # Hugging Face datasets' image struct: bytes, or a path where the bytes are null
    struct = pa.array([{"bytes": files[0], "path": None}, {"bytes": None, "path": paths[0]}],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    rows = run(classifier, pa.table({"image": struct}), "pyarrow").to_pylist()
    assert rows[0] == rows[1] == from_bytes.to_pylist()[0]


def test_chunks_and_threads_keep_every_row_in_place(models):
    images = [None if i % 4 == 2 else image_bytes(i) for i in range(11)]
    source = pa.table({"id": list(range(11)), "image": images})
    one_pass = run(ImageClassifier(models["classifier"], model_batch_size=64, decode_threads=1), source)
    pipelined = run(ImageClassifier(models["classifier"], model_batch_size=2, decode_threads=3), source)
    assert pipelined.column("id").to_pylist() == list(range(11))
    assert pipelined.column("labels").to_pylist() == one_pass.column("labels").to_pylist()
    np.testing.assert_allclose(
        np.array([s or [0.0] * 5 for s in pipelined.column("scores").to_pylist()]),
        np.array([s or [0.0] * 5 for s in one_pass.column("scores").to_pylist()]), rtol=1e-5)


def test_images_of_several_input_sizes_in_one_chunk(tmp_path):
    """A processor that keeps each image's size (a convolutional model takes any): the chunk
    runs one forward pass per size, and each row gets what it gets alone."""
    model = build_tiny_resnet(tmp_path / "resnet")
    images = [image_bytes(1, size=(40, 30)), image_bytes(2, size=(24, 24)), image_bytes(3, size=(40, 30))]
    classifier = ImageClassifier(model, top_k=3)
    together = run(classifier, pa.table({"id": [0, 1, 2], "image": images})).to_pylist()
    alone = [run(classifier, pa.table({"id": [i], "image": [data]})).to_pylist()[0] for i, data in enumerate(images)]
    assert [r["labels"] for r in together] == [r["labels"] for r in alone]
    for mine, theirs in zip(together, alone, strict=True):
        np.testing.assert_allclose(mine["scores"], theirs["scores"], rtol=1e-5)
    vectors = run(ImageEmbedder(model, pooling="mean"), pa.table({"id": [0, 1, 2], "image": images}))
    assert vectors.schema.field("embedding").type == pa.list_(pa.float32(), 16)  # the last stage's channels


def test_a_bad_image_fails_its_row_alone(models, tmp_path):
    (tmp_path / "corrupt.png").write_bytes(NOT_AN_IMAGE)
    (tmp_path / "good.png").write_bytes(image_bytes(5))
    source = pa.table({"id": [0, 1, 2, 3, 4], "image": [
        str(tmp_path / "good.png"), str(tmp_path / "corrupt.png"), str(tmp_path / "missing.png"), None,
        str(tmp_path / "good.png"),
    ]})
    with pytest.raises(RowsFailed) as failed:
        ImageClassifier(models["classifier"], model_batch_size=2)(to_batch(source, "numpy"))
    errors = failed.value.errors
    assert sorted(errors) == [1, 2]
    assert "column 'image'" in errors[1] and "corrupt.png" in errors[1] and "cannot decode" in errors[1]
    assert "missing.png" in errors[2] and "no such file" in errors[2]
    output = failed.value.output  # the other rows' answers, in order, computed once
    assert output.column("id").to_pylist() == [0, 3, 4]
    assert output.column("labels").to_pylist()[1] is None
    assert output.column("labels").to_pylist()[0] == output.column("labels").to_pylist()[2]
    # bytes that are cut off, or no image at all
    with pytest.raises(RowsFailed) as failed:
        ImageClassifier(models["classifier"])(pa.table({"id": [0, 1, 2], "image": [truncated_png(), image_bytes(1), b"x"]}))
    assert sorted(failed.value.errors) == [0, 2]
    assert "truncated" in failed.value.errors[0] and "no image format PIL knows" in failed.value.errors[2]


def test_embedder_vectors_nulls_and_pooling(models):
    images = [image_bytes(1), None, image_bytes(2, "JPEG")]
    source = pa.table({"id": [0, 1, 2], "image": images})
    embedder = ImageEmbedder(models["embedder"])
    out = run(embedder, source)
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), HIDDEN)
    vectors = out.column("embedding").to_pylist()
    assert vectors[1] is None
    for data, vector in ((images[0], vectors[0]), (images[2], vectors[2])):
        np.testing.assert_allclose(vector, by_hand(models["embedder"], data, kind="embedder"), rtol=1e-4, atol=1e-6)
    # only nulls: the column keeps its type and width
    nulls = run(embedder, pa.table({"id": [5], "image": pa.array([None], pa.binary())}), "pyarrow")
    assert nulls.schema.field("embedding").type == pa.list_(pa.float32(), HIDDEN)
    assert nulls.column("embedding").to_pylist() == [None]
    # the other poolings give other vectors; a checkpoint without pooler weights never uses random ones
    cls = run(ImageEmbedder(models["embedder"], pooling="cls", normalize=False), source).column("embedding").to_pylist()
    assert not np.allclose(cls[0], vectors[0])
    from_classifier = ImageEmbedder(models["classifier"])
    assert from_classifier.pooling == "cls"
    with pytest.raises(PredictorError, match="no pooler weights"):
        ImageEmbedder(models["classifier"], pooling="pooler")


def test_clear_errors(models):
    with pytest.raises(PredictorError, match="dtype='float8'"):
        ImageClassifier(models["classifier"], dtype="float8")
    with pytest.raises(PredictorError, match=r"column\(s\) \['picture'\] are not in the input batch"):
        ImageClassifier(models["classifier"], image_column="picture")(pa.table({"id": [0], "image": [b""]}))
    with pytest.raises(RowsFailed, match="gs:// URL"):
        ImageClassifier(models["classifier"])(pa.table({"id": [0], "image": ["gs://bucket/a.png"]}))


def test_a_job_rejects_the_bad_image_and_writes_the_rest(models, tmp_path):
    """Through the shard runner (no Ray): a Parquet column of image bytes, bad_rows='skip'."""
    records = [{"id": i, "image": NOT_AN_IMAGE if i == 3 else image_bytes(i)} for i in range(6)]
    os.makedirs(tmp_path / "in")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "in" / "images.parquet")
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), bad_rows="skip", batch_size=4,
                     predictor="airflow_batch_provider.predictors.images:ImageClassifier",
                     predictor_kwargs={"model": models["classifier"], "top_k": 1})
    [result] = run_all(spec)
    assert (result.rows_in, result.rows_out, result.rows_rejected) == (6, 5, 1)
    table = sink_table(spec.sink_root)
    assert table.column("id").to_pylist() == [0, 1, 2, 4, 5]
    [rejected] = [json.loads(line) for path in glob.glob(str(tmp_path / "out" / "_rejected" / "*.jsonl")) for line in open(path)]
    assert (rejected["row_index"], rejected["row"]["id"], rejected["stage"]) == (3, 3, "predict")
    assert "column 'image'" in rejected["error"] and "cannot decode" in rejected["error"]


def test_images_on_s3_read_with_the_jobs_credentials(models, s3_server, s3_bucket):
    """The source lists s3:// URLs; the images are read with the job's storage options (the
    runner hands them over); a missing object is a bad row, an unreachable store is not."""
    for i in range(3):
        put(s3_server, s3_bucket, f"images/{i}.png", image_bytes(i))
    urls = [f"s3://{s3_bucket}/images/{i}.png" for i in range(3)] + [f"s3://{s3_bucket}/images/gone.png"]
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": [0, 1, 2, 3], "image": urls}), buffer)
    put(s3_server, s3_bucket, "in/images.parquet", buffer.getvalue().to_pybytes())
    spec = spec_on(s3_bucket, bad_rows="skip", predictor="airflow_batch_provider.predictors.images:ImageClassifier",
                   predictor_kwargs={"model": models["classifier"], "top_k": 2})
    [result] = run_all(spec, s3_server.storage_options())
    assert (result.rows_out, result.rows_rejected) == (3, 1)
    local = ImageClassifier(models["classifier"], top_k=2)
    local.use_storage_options(s3_server.storage_options())
    expected = run(local, pa.table({"id": [0, 1, 2], "image": [image_bytes(i) for i in range(3)]}))
    assert read_sink(s3_server, spec.sink_root).sort_by("id").to_pylist() == expected.to_pylist()
    unreachable = ImageClassifier(models["classifier"], storage_options={
        "endpoint_url": "http://127.0.0.1:9", "retries": 1, "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    })
    unreachable.use_storage_options(s3_server.storage_options())
    with pytest.raises(PredictorUnavailableError, match="no row is at fault"):
        unreachable(pa.table({"id": [0], "image": urls[:1]}))
