"""The image classifier end to end: `airflow dags test` on a local Ray, a tiny ViT built in the test."""

from __future__ import annotations

import glob
import json
import os

import pyarrow as pa
import pytest

from airflow_batch_provider.core.errors import RowsFailed
from airflow_batch_provider.core.execution.batches import to_batch
from airflow_batch_provider.predictors.images import ImageClassifier
from tests.helpers import make_spec, sink_table, write_parquet
from tests.tiny_vision import LABELS, NOT_AN_IMAGE, build_tiny_vit, image_bytes

pytestmark = pytest.mark.slow

PREDICTOR = "airflow_batch_provider.predictors.images:ImageClassifier"
NULL, CORRUPT, MISSING = 4, 7, 10


def test_image_dag_labels_every_row_once_and_rejects_the_bad_images(dag_tester, tmp_path):
    model = build_tiny_vit(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i in range(12):
        name = f"{i}.{'jpg' if i % 2 else 'png'}"
        if i == CORRUPT:
            (images / name).write_bytes(NOT_AN_IMAGE)
        elif i != MISSING:
            (images / name).write_bytes(image_bytes(i, "JPEG" if i % 2 else "PNG"))
        records.append({"id": i, "path": None if i == NULL else name})
    write_parquet(str(tmp_path / "in" / "images.parquet"), records, row_group_size=6)
    kwargs = {"model": model, "image_column": "path", "root": str(images), "top_k": 3,
              "model_batch_size": 2, "decode_threads": 2}
    spec = make_spec(
        str(tmp_path / "in"), str(tmp_path / "out"), predictor=PREDICTOR, predictor_kwargs=kwargs, bad_rows="skip",
        rows_per_shard=6, batch_size=4, num_replicas=1, num_cpus=1,
    )
    run = dag_tester.run(spec)
    assert run.state == "success", run.output[-3000:]
    assert run.plan_counts() == (2, 0, 2)

    table = sink_table(spec.sink_root)
    good = [i for i in range(12) if i not in (CORRUPT, MISSING)]
    assert table.column("id").to_pylist() == good  # every readable row, once
    rows = table.to_pylist()
    for row in rows:
        if row["id"] == NULL:
            assert (row["labels"], row["scores"]) == (None, None)
        else:
            assert len(row["labels"]) == 3 and set(row["labels"]) <= set(LABELS)
            assert row["scores"] == sorted(row["scores"], reverse=True)
    rejected = sorted((json.loads(line) for path in glob.glob(os.path.join(spec.sink_root, "_rejected", "*.jsonl"))
                       for line in open(path)), key=lambda r: r["row"]["id"])
    assert [r["row"]["id"] for r in rejected] == [CORRUPT, MISSING], rejected
    assert "7.jpg" in rejected[0]["error"] and "cannot decode" in rejected[0]["error"]
    assert "10.png" in rejected[1]["error"] and "no such file" in rejected[1]["error"]
    manifest = json.load(open(os.path.join(spec.sink_root, "_SUCCESS")))
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (12, 10, 2)
    # the replica's answers are what the predictor gives here (scores to float rounding: the
    # replica's forward passes group other images)
    with pytest.raises(RowsFailed) as failed:
        ImageClassifier(**kwargs)(to_batch(pa.Table.from_pylist(records), "numpy"))
    here = failed.value.output
    assert here.column("labels").to_pylist() == table.column("labels").to_pylist()
    for mine, theirs in zip(here.column("scores").to_pylist(), table.column("scores").to_pylist(), strict=True):
        assert mine == theirs or mine == pytest.approx(theirs, rel=1e-5)
