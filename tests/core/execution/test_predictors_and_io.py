"""Predictor contract, batch formats, and clear errors for bad input or bad output."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.errors import BatchSpecError, InputChangedError, InputDataError, PredictorError
from airflow_batch_provider.core.execution.batches import build_predictor, from_batch, to_batch
from airflow_batch_provider.core.execution.runner import ShardRunner
from tests.helpers import make_spec, rows, write_jsonl


def run(spec):
    runner = ShardRunner(spec)
    results = [runner.run(s, new_attempt()) for s in plan_job(spec).pending]
    return results, finalize_job(spec)


@pytest.mark.parametrize("fmt", ["numpy", "pandas", "pyarrow"])
def test_batch_formats_round_trip(fmt):
    table = pa.table({"id": [1, 2], "text": ["a", "b"]})
    batch = to_batch(table, fmt)
    expected = {"numpy": dict, "pandas": pd.DataFrame, "pyarrow": pa.Table}[fmt]
    assert isinstance(batch, expected)
    assert from_batch(batch, fmt).to_pylist() == table.to_pylist()


def test_2d_arrays_become_fixed_size_lists_and_back():
    table = from_batch({"id": np.arange(3), "embedding": np.ones((3, 4), dtype=np.float32)}, "numpy")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert to_batch(table, "numpy")["embedding"].shape == (3, 4)


@pytest.mark.parametrize(
    "output, message",
    [
        ([1, 2], "returned list"),
        ({"a": np.arange(2), "b": np.arange(3)}, "different lengths"),
        ({"a": np.zeros((2, 2, 2))}, "only 1-D and 2-D"),
    ],
)
def test_bad_predictor_output_is_named(output, message):
    with pytest.raises(PredictorError, match=message):
        from_batch(output, "numpy")


def test_unloadable_predictor_is_named():
    with pytest.raises(PredictorError, match="cannot import module 'no_such_pkg.mod'"):
        build_predictor("no_such_pkg.mod:X", {})
    with pytest.raises(PredictorError, match="has no attribute 'Nope'"):
        build_predictor("tests.predictors:Nope", {})
    with pytest.raises(PredictorError, match="rejected predictor_kwargs"):
        build_predictor("tests.predictors:Doubler", {"bogus": 1})


def test_filtering_predictor_counts_rows_in_and_out(tmp_path, jsonl_source):
    spec = make_spec(jsonl_source, str(tmp_path / "out"), predictor="tests.predictors:EvenFilter")
    results, manifest = run(spec)
    assert manifest["rows_in"] == 380 and manifest["rows_out"] == 190
    assert sum(r.rows_out for r in results) == 190
    ids = ds.dataset(spec.sink_root, format="parquet").to_table().column("id").to_pylist()
    assert sorted(ids) == list(range(0, 380, 2))


@pytest.mark.parametrize(
    "predictor, fmt", [("tests.predictors:PandasUpper", "pandas"), ("tests.predictors:ArrowPassthrough", "pyarrow")]
)
def test_pandas_and_arrow_predictors_and_jsonl_sink(tmp_path, jsonl_source, predictor, fmt):
    spec = make_spec(jsonl_source, str(tmp_path / "out"), predictor=predictor, batch_format=fmt, sink_format="jsonl")
    _, manifest = run(spec)
    assert manifest["rows_out"] == 380
    table = ds.dataset(spec.sink_root, format="json").to_table()
    assert sorted(table.column("id").to_pylist()) == list(range(380))


def test_embedding_output_and_parquet_source(tmp_path, parquet_source):
    spec = make_spec(parquet_source, str(tmp_path / "out"), predictor="tests.predictors:Embedder", columns=["id"])
    _, manifest = run(spec)
    table = ds.dataset(spec.sink_root, format="parquet").to_table()
    assert manifest["rows_out"] == 370
    assert table.schema.field("embedding").type.list_size == 3


def test_invalid_json_line_is_named(tmp_path):
    path = write_jsonl(str(tmp_path / "in" / "bad.jsonl"), rows(5))
    with open(path, "a") as handle:
        handle.write('{"id": 5, "value": \n')
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"))
    with pytest.raises(InputDataError, match=r"bad.jsonl: line 6 is not valid JSON"):
        run(spec)
    assert not [n for n in os.listdir(spec.sink_root) if n.startswith("part-")]


def test_non_object_json_line_is_named(tmp_path):
    path = write_jsonl(str(tmp_path / "in" / "bad.jsonl"), rows(2))
    with open(path, "a") as handle:
        handle.write("[1, 2]\n")
    with pytest.raises(InputDataError, match="line 3 is a JSON list, not an object"):
        run(make_spec(str(tmp_path / "in"), str(tmp_path / "out")))


def test_missing_column_is_named(tmp_path, jsonl_source):
    spec = make_spec(jsonl_source, str(tmp_path / "out"), columns=["id", "nope"])
    with pytest.raises(BatchSpecError, match=r"columns \['nope'\] are not in any input file"):
        run(spec)  # refused at plan time, before any shard runs


def test_file_changed_after_planning_is_detected(tmp_path):
    path = write_jsonl(str(tmp_path / "in" / "a.jsonl"), rows(50))
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"))
    job = plan_job(spec)
    write_jsonl(path, rows(20))
    with pytest.raises(InputChangedError, match=r"a.jsonl changed \(version .* when planned, .* now\) since the plan recorded it"):
        ShardRunner(spec).run(job.pending[0], new_attempt())


def test_predictor_is_loaded_once_per_runner(tmp_path, jsonl_source):
    spec = make_spec(jsonl_source, str(tmp_path / "out"))
    runner = ShardRunner(spec)
    predictor = runner.predictor
    for shard in plan_job(spec).pending:
        runner.run(shard, new_attempt())
    assert runner.predictor is predictor
