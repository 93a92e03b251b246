"""Bad-input corpus, schema cases (issue 11 items 1, 4 and 6): one schema per job, values that
keep their meaning, ``file://`` paths, and a sink inside the source.

Every case runs a real job through the core (plan, each shard through a ShardRunner, finalize),
in both shard orders where order could matter, and reads the sink back with pyarrow.dataset,
pandas and DuckDB (``read_back``), asserting the exact rows and columns, or the exact error.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.domain.schema.conform import RowOrigin, conform_table
from airflow_batch_provider.core.errors import BatchSpecError, InputDataError
from airflow_batch_provider.core.execution.runner import ShardRunner
from airflow_batch_provider.core.spec import JobSpec
from tests.corpus.readback import read_back

ORDERS = ["forward", "reverse"]


def write_lines(path, lines: list[str]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return str(path)


def jsonl(path, records: list[dict]) -> str:
    return write_lines(path, [json.dumps(r) for r in records])


def run_job(source, sink, predictor="tests.predictors:Identity", order="forward", storage_options=None, **kw) -> dict:
    kw.setdefault("rows_per_shard", 1000)
    kw.setdefault("source_format", "parquet" if any(n.endswith(".parquet") for n in _names(str(source))) else "jsonl")
    spec = JobSpec(source=str(source), sink=str(sink), predictor=predictor, **kw)
    job = plan_job(spec) if storage_options is None else _plan_s3(spec, storage_options)
    shards = job.pending if order == "forward" else job.pending[::-1]
    runner = ShardRunner(spec, storage_options)
    for shard in shards:
        runner.run(shard, new_attempt())
    if storage_options is None:
        return finalize_job(spec)
    from airflow_batch_provider.core.api import finalize

    return finalize(spec, storage_options)


def _names(source: str) -> list[str]:
    path = source.removeprefix("file://")
    return os.listdir(path) if os.path.isdir(path) else [path]


def _plan_s3(spec, storage_options):
    from airflow_batch_provider.core.api import plan

    return plan(spec, storage_options)


def by_id(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: r["id"])


# -- 1. one schema per job: JSONL input ---------------------------------------------------------
@pytest.mark.parametrize("order", ORDERS)
def test_jsonl_field_null_in_every_row_of_one_shard(tmp_path, order):
    jsonl(tmp_path / "in/a.jsonl", [{"id": i, "text": None} for i in range(3)])
    jsonl(tmp_path / "in/b.jsonl", [{"id": i, "text": f"t{i}"} for i in range(3, 6)])
    manifest = run_job(tmp_path / "in", tmp_path / "out", order=order)
    table = read_back(str(tmp_path / "out"), "parquet")
    assert table.schema.field("text").type == pa.string()
    assert by_id(table) == [{"id": i, "text": None if i < 3 else f"t{i}"} for i in range(6)]
    assert manifest["schema"]["columns"] == {"id": "int64", "text": "string"}


@pytest.mark.parametrize("order", ORDERS)
def test_jsonl_key_absent_in_one_shard(tmp_path, order):
    jsonl(tmp_path / "in/a.jsonl", [{"id": i} for i in range(3)])
    jsonl(tmp_path / "in/b.jsonl", [{"id": i, "extra": i * 10} for i in range(3, 5)])
    run_job(tmp_path / "in", tmp_path / "out", order=order)
    table = read_back(str(tmp_path / "out"), "parquet")
    assert by_id(table) == [{"id": 0, "extra": None}, {"id": 1, "extra": None}, {"id": 2, "extra": None},
                            {"id": 3, "extra": 30}, {"id": 4, "extra": 40}]


@pytest.mark.parametrize("sink_format", ["parquet", "jsonl"])
@pytest.mark.parametrize("order", ORDERS)
def test_int_in_one_shard_float_in_another(tmp_path, sink_format, order):
    jsonl(tmp_path / "in/a.jsonl", [{"id": 0, "value": 1}, {"id": 1, "value": 2}])
    jsonl(tmp_path / "in/b.jsonl", [{"id": 2, "value": 2.5}])
    run_job(tmp_path / "in", tmp_path / "out", order=order, sink_format=sink_format)
    table = read_back(str(tmp_path / "out"), sink_format)
    assert table.schema.field("value").type == pa.float64()
    assert by_id(table) == [{"id": 0, "value": 1.0}, {"id": 1, "value": 2.0}, {"id": 2, "value": 2.5}]


def test_jsonl_types_that_cannot_be_unified_are_refused_at_plan_time(tmp_path):
    jsonl(tmp_path / "in/a.jsonl", [{"id": 0, "code": 7}])
    jsonl(tmp_path / "in/b.jsonl", [{"id": 1, "code": "x7"}])
    with pytest.raises(InputDataError) as err:
        run_job(tmp_path / "in", tmp_path / "out")
    assert str(err.value) == (
        f"column 'code' is int64 in {tmp_path}/in/a.jsonl but string in {tmp_path}/in/b.jsonl; no type holds both "
        "without changing values. Declare input_schema on the BatchSpec with a type that holds every value, or fix the input."
    )
    assert not os.path.exists(tmp_path / "out" / "_SUCCESS")


def test_declared_input_schema_takes_both(tmp_path):
    jsonl(tmp_path / "in/a.jsonl", [{"id": 0, "code": 7}])
    jsonl(tmp_path / "in/b.jsonl", [{"id": 1, "code": "x7"}])
    run_job(tmp_path / "in", tmp_path / "out", input_schema={"id": "int64", "code": "string"})
    assert by_id(read_back(str(tmp_path / "out"), "parquet")) == [{"id": 0, "code": "7"}, {"id": 1, "code": "x7"}]


def test_value_after_the_sample_that_does_not_fit_names_line_and_column(tmp_path):
    records = [{"id": i, "n": i} for i in range(700)]
    records[650]["n"] = "six hundred fifty"  # line 651: past the plan-time sample of the first 500 lines
    jsonl(tmp_path / "in/a.jsonl", records)
    with pytest.raises(InputDataError) as err:
        run_job(tmp_path / "in", tmp_path / "out")
    message = str(err.value)
    assert message.startswith(f"{tmp_path}/in/a.jsonl: line 651 (shard ")
    assert message.endswith(
        "): column 'n' holds string value 'six hundred fifty', which int64 in the job's schema cannot hold unchanged. "
        "Declare input_schema on the BatchSpec with a type that holds every value, or fix the input."
    )


# -- 1. one schema per job: Parquet input -------------------------------------------------------
@pytest.mark.parametrize("order", ORDERS)
def test_parquet_extra_column_in_second_file(tmp_path, order):
    os.makedirs(tmp_path / "in")
    pq.write_table(pa.table({"id": [0, 1], "value": [0.5, 1.5]}), tmp_path / "in/a.parquet")
    pq.write_table(pa.table({"id": [2], "value": [2.5], "label": ["x"]}), tmp_path / "in/b.parquet")
    run_job(tmp_path / "in", tmp_path / "out", order=order)
    assert by_id(read_back(str(tmp_path / "out"), "parquet")) == [
        {"id": 0, "value": 0.5, "label": None}, {"id": 1, "value": 1.5, "label": None}, {"id": 2, "value": 2.5, "label": "x"},
    ]


@pytest.mark.parametrize("order", ORDERS)
def test_parquet_unifiable_types_int32_int64_and_null_column(tmp_path, order):
    os.makedirs(tmp_path / "in")
    pq.write_table(pa.table({"id": pa.array([0, 1], pa.int32()), "note": pa.nulls(2)}), tmp_path / "in/a.parquet")
    pq.write_table(pa.table({"id": pa.array([2**40], pa.int64()), "note": ["n"]}), tmp_path / "in/b.parquet")
    manifest = run_job(tmp_path / "in", tmp_path / "out", order=order)
    table = read_back(str(tmp_path / "out"), "parquet")
    assert table.schema == pa.schema([("id", pa.int64()), ("note", pa.string())])
    assert by_id(table) == [{"id": 0, "note": None}, {"id": 1, "note": None}, {"id": 2**40, "note": "n"}]
    assert manifest["input_schema"]["columns"] == {"id": "int64", "note": "string"}


def test_parquet_types_that_cannot_be_unified_are_refused_at_plan_time(tmp_path):
    os.makedirs(tmp_path / "in")
    pq.write_table(pa.table({"id": [0], "value": [1.5]}), tmp_path / "in/a.parquet")
    pq.write_table(pa.table({"id": [1], "value": ["high"]}), tmp_path / "in/b.parquet")
    with pytest.raises(InputDataError) as err:
        run_job(tmp_path / "in", tmp_path / "out")
    assert str(err.value).startswith(
        f"column 'value' is float64 in {tmp_path}/in/a.parquet but string in {tmp_path}/in/b.parquet; "
        "no type holds both without changing values. Declare input_schema"
    )
    assert not os.path.exists(tmp_path / "out")  # refused before any part was written


# -- 4. values keep their meaning --------------------------------------------------------------
def test_big_integers_are_kept_exactly(tmp_path):
    big = [2**63 + 5, 2**64 - 1]
    jsonl(tmp_path / "in/a.jsonl", [{"id": 0, "big": big[0]}, {"id": 1, "big": big[1]}])
    run_job(tmp_path / "in", tmp_path / "out")
    table = read_back(str(tmp_path / "out"), "parquet")
    assert table.schema.field("big").type == pa.uint64()
    assert by_id(table) == [{"id": 0, "big": big[0]}, {"id": 1, "big": big[1]}]


@pytest.mark.parametrize("sink_format", ["parquet", "jsonl"])
def test_big_and_negative_integers_across_shards_are_kept_exactly(tmp_path, sink_format):
    jsonl(tmp_path / "in/a.jsonl", [{"id": 0, "big": 2**63 + 5}])
    jsonl(tmp_path / "in/b.jsonl", [{"id": 1, "big": -3}])
    run_job(tmp_path / "in", tmp_path / "out", sink_format=sink_format)
    if sink_format == "parquet":
        table = read_back(str(tmp_path / "out"), "parquet")
        assert table.schema.field("big").type == pa.decimal128(20, 0)
        assert [int(r["big"]) for r in by_id(table)] == [2**63 + 5, -3]
    else:  # JSON has no decimal type: the numbers are written as they were read
        lines = sorted(open(p).read() for p in (tmp_path / "out").glob("part-*.jsonl"))
        assert lines == ['{"id":0,"big":9223372036854775813}\n', '{"id":1,"big":-3}\n']


def test_integer_beyond_64_bits_is_refused_naming_file_line_and_column(tmp_path):
    jsonl(tmp_path / "in/a.jsonl", [{"id": 0, "big": 1}, {"id": 1, "big": 2**70}])
    with pytest.raises(InputDataError) as err:
        run_job(tmp_path / "in", tmp_path / "out")
    assert str(err.value) == (
        f"{tmp_path}/in/a.jsonl: line 2: column 'big': the integer {2**70} needs more than 64 bits; "
        "Declare input_schema on the BatchSpec with a type that holds every value, or fix the input."
    )


def test_big_integer_after_the_sample_is_refused_not_rounded(tmp_path):
    records = [{"id": i, "n": i} for i in range(600)]
    records[550]["n"] = 2**63 + 1
    jsonl(tmp_path / "in/a.jsonl", records)
    with pytest.raises(InputDataError) as err:
        run_job(tmp_path / "in", tmp_path / "out")
    assert "a.jsonl: line 551 (shard " in str(err.value)
    assert f"column 'n' holds uint64 value {2**63 + 1}, which int64 in the job's schema cannot hold unchanged" in str(err.value)


@pytest.mark.parametrize("batch_format", ["numpy", "pandas", "pyarrow"])
def test_nullable_integers_stay_integers(tmp_path, batch_format):
    jsonl(tmp_path / "in/a.jsonl", [{"id": 0, "n": 5}, {"id": 1, "n": None}, {"id": 2, "n": -7}])
    run_job(tmp_path / "in", tmp_path / "out", batch_format=batch_format)
    table = read_back(str(tmp_path / "out"), "parquet")
    assert table.schema.field("n").type == pa.int64()
    assert by_id(table) == [{"id": 0, "n": 5}, {"id": 1, "n": None}, {"id": 2, "n": -7}]


@pytest.mark.parametrize("batch_format", ["numpy", "pandas", "pyarrow"])
def test_list_column_with_nulls_keeps_rows_aligned(tmp_path, batch_format):
    os.makedirs(tmp_path / "in")
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(9, dtype=np.float32)), 3, mask=pa.array([False, True, False]))
    tags = pa.array([["a"], None, ["b", "c"]])
    pq.write_table(pa.table({"id": [0, 1, 2], "vec": vectors, "tags": tags}), tmp_path / "in/a.parquet")
    run_job(tmp_path / "in", tmp_path / "out", batch_format=batch_format)
    table = read_back(str(tmp_path / "out"), "parquet")
    assert table.schema.field("vec").type == pa.list_(pa.float32(), 3)
    assert by_id(table) == [
        {"id": 0, "vec": [0.0, 1.0, 2.0], "tags": ["a"]},
        {"id": 1, "vec": None, "tags": None},
        {"id": 2, "vec": [6.0, 7.0, 8.0], "tags": ["b", "c"]},
    ]


@pytest.mark.parametrize("batch_format", ["numpy", "pandas", "pyarrow"])
def test_sentence_embedder_gives_a_null_embedding_for_a_null_text(tmp_path, batch_format):
    jsonl(tmp_path / "in/a.jsonl", [{"id": 0, "text": "hello"}, {"id": 1, "text": None}, {"id": 2, "text": "None"}])
    run_job(tmp_path / "in", tmp_path / "out", predictor="airflow_batch_provider.predictors.sentence_embedding:SentenceEmbedder",
            batch_format=batch_format)
    rows = by_id(read_back(str(tmp_path / "out"), "parquet"))
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert rows[1]["embedding"] is None
    assert read_back(str(tmp_path / "out"), "parquet").schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert len(rows[0]["embedding"]) == len(rows[2]["embedding"]) == 384
    assert rows[0]["embedding"] != rows[2]["embedding"]


@pytest.mark.parametrize("order", ORDERS)
def test_empty_first_shard_writes_no_columnless_part(tmp_path, order):
    write_lines(tmp_path / "in/a.jsonl", ["", "  ", ""])  # blank lines only: sorts first
    jsonl(tmp_path / "in/b.jsonl", [{"id": 0, "text": "x"}, {"id": 1, "text": "y"}])
    manifest = run_job(tmp_path / "in", tmp_path / "out", order=order)
    assert by_id(read_back(str(tmp_path / "out"), "parquet")) == [{"id": 0, "text": "x"}, {"id": 1, "text": "y"}]
    assert sorted(p["rows_out"] for p in manifest["parts"]) == [0, 2]
    assert [p["part"] for p in manifest["parts"] if not p["rows_out"]] == [None]  # no part: nothing column-less to read
    assert len(list((tmp_path / "out").glob("part-*"))) == 1
    from airflow_batch_provider.core.api import sink_status, verify_sink

    assert verify_sink(str(tmp_path / "out")).problems == []
    status = sink_status(str(tmp_path / "out"))
    assert (status.committed, status.pending, status.rows_out) == (2, 0, 2)


def test_filter_predictor_emptying_a_shard_writes_no_part(tmp_path):
    jsonl(tmp_path / "in/a.jsonl", [{"id": 1, "value": 1.0}, {"id": 3, "value": 3.0}])  # EvenFilter keeps none
    jsonl(tmp_path / "in/b.jsonl", [{"id": 2, "value": 2.0}])
    manifest = run_job(tmp_path / "in", tmp_path / "out", predictor="tests.predictors:EvenFilter", sink_format="jsonl")
    assert by_id(read_back(str(tmp_path / "out"), "jsonl")) == [{"id": 2, "value": 2.0}]
    assert manifest["rows_in"] == 3 and manifest["rows_out"] == 1


# -- 1. output schema ----------------------------------------------------------------------------
def test_output_type_drift_across_shards_fails_naming_shard_file_line_column_and_types(tmp_path):
    jsonl(tmp_path / "in/a.jsonl", [{"id": i} for i in range(100)])  # ids < 100: the predictor returns ints
    jsonl(tmp_path / "in/b.jsonl", [{"id": i} for i in range(100, 103)])  # then floats
    with pytest.raises(InputDataError) as err:
        run_job(tmp_path / "in", tmp_path / "out", predictor="tests.predictors:DriftingOutput")
    message = str(err.value)
    assert message.startswith(f"{tmp_path}/in/b.jsonl: line 1 (shard ")
    assert message.endswith(
        "): column 'out' holds float64 value 100.5, which int64 in the job's output schema cannot hold unchanged. "
        "Declare output_schema on the BatchSpec, or make the predictor return the same type in every batch."
    )


def test_output_drift_that_is_lossless_is_conformed(tmp_path):
    """Floats first, ints later: the ints are written as floats, every part has one schema."""
    jsonl(tmp_path / "in/a.jsonl", [{"id": i} for i in range(100)])
    jsonl(tmp_path / "in/b.jsonl", [{"id": i} for i in range(100, 102)])
    run_job(tmp_path / "in", tmp_path / "out", predictor="tests.predictors:DriftingOutput", order="reverse")
    table = read_back(str(tmp_path / "out"), "parquet")
    assert table.schema.field("out").type == pa.float64()
    assert by_id(table)[:2] == [{"id": 0, "out": 0.0}, {"id": 1, "out": 1.0}]
    assert by_id(table)[-1] == {"id": 101, "out": 101.5}


@pytest.mark.parametrize("order", ORDERS)
def test_declared_output_schema(tmp_path, order):
    jsonl(tmp_path / "in/a.jsonl", [{"id": i} for i in range(100)])
    jsonl(tmp_path / "in/b.jsonl", [{"id": i} for i in range(100, 102)])
    manifest = run_job(tmp_path / "in", tmp_path / "out", predictor="tests.predictors:DriftingOutput", order=order,
                       output_schema={"id": "int64", "out": "float64"})
    table = read_back(str(tmp_path / "out"), "parquet")
    assert table.schema == pa.schema([("id", pa.int64()), ("out", pa.float64())])
    assert table.num_rows == 102
    assert manifest["schema"]["columns"] == {"id": "int64", "out": "float64"}
    assert manifest["fingerprint_inputs"]["output_schema"] == {"id": "int64", "out": "float64"}


# -- 6. file:// and a sink inside the source ----------------------------------------------------
def test_file_urls_work_like_plain_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "in/a.jsonl", [{"id": 0, "text": "x"}])
    manifest = run_job(f"file://{tmp_path}/in", f"file://{tmp_path}/out", checkpoint_dir=f"file://{tmp_path}/ck")
    assert manifest["sink"] == f"{tmp_path}/out"
    assert os.path.exists(tmp_path / "out/_SUCCESS") and os.path.exists(tmp_path / "ck/plan.json")
    assert not os.path.exists(tmp_path / "file:")
    assert by_id(read_back(str(tmp_path / "out"), "parquet")) == [{"id": 0, "text": "x"}]


@pytest.mark.parametrize("where", ["sink", "checkpoint_dir"])
def test_sink_or_checkpoint_inside_source_is_refused(tmp_path, where):
    jsonl(tmp_path / "in/a.jsonl", [{"id": 0}])
    paths = {"sink": str(tmp_path / "out"), "checkpoint_dir": None, where: str(tmp_path / "in/results")}
    with pytest.raises(BatchSpecError) as err:
        JobSpec(source=f"file://{tmp_path}/in/", predictor="tests.predictors:Identity", source_format="jsonl", **paths)
    assert str(err.value) == (
        f"{where}='{tmp_path}/in/results' is inside source='{tmp_path}/in/': the next plan would read the job's own "
        f"output as input. Put the {where} outside the source directory."
    )


# -- the conform step the bad-row policy builds on ----------------------------------------------
def test_conform_table_reports_bad_rows_to_on_bad():
    table = pa.table({"n": pa.array([1.0, 2.5, 3.0]), "x": [None, "kept?", None]})
    reported = []
    out = conform_table(table, pa.schema([("n", pa.int64())]), RowOrigin("f.jsonl", 10), on_bad=reported.extend)
    assert out.to_pylist() == [{"n": 1}, {"n": 3}]
    assert reported == [
        (1, "n", "f.jsonl: line 11: column 'n' holds float64 value 2.5, which int64 in the job's schema cannot hold unchanged"),
    ]


# -- S3: plan-time sampling on the object store --------------------------------------------------
@pytest.mark.slow
def test_s3_null_only_shard_and_parquet_footers(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="in/a.jsonl", Body=b'{"id": 0, "text": null}\n{"id": 1, "text": null}\n')
    client.put_object(Bucket=s3_bucket, Key="in/b.jsonl", Body=b'{"id": 2, "text": "t", "extra": 1.5}\n')
    options = s3_server.storage_options()
    manifest = run_job(f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out", storage_options=options, order="reverse")
    assert manifest["schema"]["columns"] == {"id": "int64", "text": "string", "extra": "float64"}
    local = tmp_path / "copy"
    local.mkdir()
    for part in manifest["parts"]:
        body = client.get_object(Bucket=s3_bucket, Key=f"out/{part['part']}")["Body"].read()
        (local / part["part"]).write_bytes(body)
    assert by_id(read_back(str(local), "parquet")) == [
        {"id": 0, "text": None, "extra": None}, {"id": 1, "text": None, "extra": None}, {"id": 2, "text": "t", "extra": 1.5},
    ]


def test_jsonl_sink_null_only_shard_reads_back_with_the_schema_from_success(tmp_path):
    """JSON carries no types: pyarrow.dataset takes a JSONL sink's types from its first part,
    so a column null in every row of that part reads as null. The schema in ``_SUCCESS`` fixes it."""
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    from airflow_batch_provider.core.domain.schema.arrow_types import schema_from_json

    jsonl(tmp_path / "in/a.jsonl", [{"id": 0, "text": None}])
    jsonl(tmp_path / "in/b.jsonl", [{"id": 1, "text": "t"}])
    manifest = run_job(tmp_path / "in", tmp_path / "out", sink_format="jsonl")
    schema = schema_from_json(manifest["schema"])
    parts = sorted(str(p) for p in (tmp_path / "out").glob("part-*.jsonl"))
    assert by_id(ds.dataset(parts, format="json", schema=schema).to_table()) == [{"id": 0, "text": None}, {"id": 1, "text": "t"}]
    frame = pd.concat([pd.read_json(p, lines=True) for p in parts], ignore_index=True)
    assert sorted(frame["id"]) == [0, 1] and sorted(frame.columns) == ["id", "text"]
    assert sorted(duckdb.sql(f"select * from read_json('{tmp_path}/out/part-*.jsonl', format='newline_delimited')").fetchall()) == [
        (0, None), (1, "t"),
    ]


def test_key_first_seen_after_the_sample_fails_naming_its_line_blank_lines_counted(tmp_path):
    lines = [json.dumps({"id": i}) for i in range(600)]
    lines[1:1] = ["", "   "]  # two blank lines: rows and lines part ways
    lines.append(json.dumps({"id": 600, "surprise": "x"}))  # line 603, past the 500-line sample
    write_lines(tmp_path / "in/a.jsonl", lines)
    with pytest.raises(InputDataError) as err:
        run_job(tmp_path / "in", tmp_path / "out")
    assert str(err.value).startswith(f"{tmp_path}/in/a.jsonl: line 603 (shard ")
    assert str(err.value).endswith(
        "): column 'surprise' (value 'x') is not in the job's schema (columns ['id']). "
        "Declare input_schema on the BatchSpec with a type that holds every value, or fix the input."
    )


def test_declared_input_schema_selects_columns_in_both_formats(tmp_path):
    jsonl(tmp_path / "in/a.jsonl", [{"id": 0, "keep": "k", "other": 1}])
    run_job(tmp_path / "in", tmp_path / "out", input_schema={"id": "int64", "keep": "string"})
    assert by_id(read_back(str(tmp_path / "out"), "parquet")) == [{"id": 0, "keep": "k"}]
    os.makedirs(tmp_path / "pin")
    pq.write_table(pa.table({"id": [0], "keep": ["k"], "other": [1]}), tmp_path / "pin/a.parquet")
    run_job(tmp_path / "pin", tmp_path / "pout", input_schema={"id": "int64", "keep": "string"})
    assert by_id(read_back(str(tmp_path / "pout"), "parquet")) == [{"id": 0, "keep": "k"}]


def test_crlf_bom_free_jsonl_and_no_trailing_newline_keep_one_schema(tmp_path):
    os.makedirs(tmp_path / "in")
    (tmp_path / "in/a.jsonl").write_bytes(b'{"id": 0, "v": 1}\r\n{"id": 1, "v": null}\r\n')
    (tmp_path / "in/b.jsonl").write_bytes(b'{"id": 2, "v": 2.5}')  # no trailing newline
    run_job(tmp_path / "in", tmp_path / "out")
    assert by_id(read_back(str(tmp_path / "out"), "parquet")) == [{"id": 0, "v": 1.0}, {"id": 1, "v": None}, {"id": 2, "v": 2.5}]


def test_integer_above_2_53_in_a_float_column_is_refused_not_rounded(tmp_path):
    jsonl(tmp_path / "in/a.jsonl", [{"id": 0, "x": 0.5}, {"id": 1, "x": 2**53 + 1}])
    with pytest.raises(InputDataError) as err:
        run_job(tmp_path / "in", tmp_path / "out")
    assert "a.jsonl: line 2 (shard " in str(err.value)
    assert f"column 'x' holds int64 value {2**53 + 1}, which float64 in the job's schema cannot hold unchanged" in str(err.value)
    jsonl(tmp_path / "in2/a.jsonl", [{"id": 0, "x": 0.5}, {"id": 1, "x": 2**53 + 1}])
    run_job(tmp_path / "in2", tmp_path / "out2", input_schema={"id": "int64", "x": "decimal128(38, 1)"})
    assert [r["x"] for r in by_id(read_back(str(tmp_path / "out2"), "parquet"))] == [
        __import__("decimal").Decimal("0.5"), __import__("decimal").Decimal(2**53 + 1)]


@pytest.mark.parametrize("order", ORDERS)
def test_zero_row_parquet_file_sorting_first(tmp_path, order):
    os.makedirs(tmp_path / "in")
    pq.write_table(pa.table({"id": pa.array([], pa.int64()), "value": pa.array([], pa.float64())}), tmp_path / "in/a.parquet")
    pq.write_table(pa.table({"id": [1, 2], "value": [0.5, 1.5]}), tmp_path / "in/b.parquet")
    manifest = run_job(tmp_path / "in", tmp_path / "out", order=order)
    assert by_id(read_back(str(tmp_path / "out"), "parquet")) == [{"id": 1, "value": 0.5}, {"id": 2, "value": 1.5}]
    assert manifest["rows_out"] == 2 and len(list((tmp_path / "out").glob("part-*"))) == 1


def test_nested_values_and_all_null_column(tmp_path):
    jsonl(tmp_path / "in/a.jsonl", [{"id": 0, "meta": {"k": 1}, "tags": ["a"], "gone": None}])
    jsonl(tmp_path / "in/b.jsonl", [{"id": 1, "meta": {"k": 2, "extra": "x"}, "tags": [], "gone": None}])
    run_job(tmp_path / "in", tmp_path / "out", batch_format="pyarrow")
    table = read_back(str(tmp_path / "out"), "parquet")
    assert table.schema.field("meta").type == pa.struct([("k", pa.int64()), ("extra", pa.string())])
    assert table.schema.field("gone").type == pa.null()
    assert by_id(table) == [
        {"id": 0, "meta": {"k": 1, "extra": None}, "tags": ["a"], "gone": None},
        {"id": 1, "meta": {"k": 2, "extra": "x"}, "tags": [], "gone": None},
    ]


def test_resume_false_forgets_the_recorded_output_schema(tmp_path):
    jsonl(tmp_path / "in/a.jsonl", [{"id": i} for i in range(100)])
    jsonl(tmp_path / "in/b.jsonl", [{"id": i} for i in range(100, 102)])
    with pytest.raises(InputDataError, match="cannot hold unchanged"):
        run_job(tmp_path / "in", tmp_path / "out", predictor="tests.predictors:DriftingOutput")
    run_job(tmp_path / "in", tmp_path / "out", predictor="tests.predictors:DriftingOutput", order="reverse", resume=False)
    assert read_back(str(tmp_path / "out"), "parquet").schema.field("out").type == pa.float64()


def test_a_new_spec_over_an_uncommitted_sink_does_not_inherit_the_output_schema(tmp_path):
    from airflow_batch_provider.core.domain.layout import JobStorage
    from airflow_batch_provider.core.domain.schema.output import record_output_schema

    jsonl(tmp_path / "in/a.jsonl", [{"id": i} for i in range(100)])
    jsonl(tmp_path / "in/b.jsonl", [{"id": i} for i in range(100, 102)])
    first = JobSpec(source=str(tmp_path / "in"), sink=str(tmp_path / "out"), predictor="tests.predictors:DriftingOutput",
                      source_format="jsonl")
    plan_job(first)
    # what a shard of the first spec leaves when it dies after its first batch, before its commit
    record_output_schema(JobStorage.for_spec(first), pa.schema([("id", pa.int64()), ("out", pa.int64())]), None)
    # (a second spec on a sink whose plan is another's unfinished one is refused: resume=False replaces it)
    run_job(tmp_path / "in", tmp_path / "out", predictor="tests.predictors:DriftingOutput", predictor_kwargs={"threshold": 0},
            resume=False)
    assert read_back(str(tmp_path / "out"), "parquet").schema.field("out").type == pa.float64()
    assert len(list((tmp_path / "out/_checkpoint").glob("output_schema-*.json"))) == 2


# -- issue 19 item 1: columns=[...] on JSONL without input_schema --------------------------------
def _mixed_rows(n: int) -> list[dict]:
    """Rows with keys the job does not select, some of them of changing type."""
    return [{"id": i, "text": f"t{i}", "meta": {"k": i}, "score": i if i % 2 else f"s{i}"} for i in range(n)]


@pytest.mark.parametrize("bad_rows", ["fail", "skip"])
def test_jsonl_columns_read_only_the_selected_keys(tmp_path, bad_rows):
    jsonl(tmp_path / "in/a.jsonl", _mixed_rows(5))
    manifest = run_job(tmp_path / "in", tmp_path / "out", columns=["id", "text"], bad_rows=bad_rows, rows_per_shard=2)
    table = read_back(str(tmp_path / "out"), "parquet")
    assert table.column_names == ["id", "text"]
    assert by_id(table) == [{"id": i, "text": f"t{i}"} for i in range(5)]
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (5, 5, 0)
    assert not os.path.exists(tmp_path / "out/_rejected")


def test_jsonl_columns_match_parquet_columns(tmp_path):
    rows = [{"id": i, "text": f"t{i}", "other": float(i)} for i in range(4)]
    jsonl(tmp_path / "jin/a.jsonl", rows)
    os.makedirs(tmp_path / "pin")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pin/a.parquet")
    run_job(tmp_path / "jin", tmp_path / "jout", columns=["text", "id"])
    run_job(tmp_path / "pin", tmp_path / "pout", columns=["text", "id"])
    jtable, ptable = read_back(str(tmp_path / "jout"), "parquet"), read_back(str(tmp_path / "pout"), "parquet")
    assert jtable.schema == ptable.schema and jtable.column_names == ["text", "id"]
    assert by_id(jtable) == by_id(ptable) == [{"id": i, "text": f"t{i}"} for i in range(4)]


def test_jsonl_columns_unselected_key_after_the_sample_is_not_read(tmp_path):
    lines = [json.dumps({"id": i}) for i in range(600)]
    lines.append(json.dumps({"id": 600, "surprise": "x"}))  # past the 500-line sample, not selected
    write_lines(tmp_path / "in/a.jsonl", lines)
    manifest = run_job(tmp_path / "in", tmp_path / "out", columns=["id"])
    assert manifest["rows_out"] == 601
    assert read_back(str(tmp_path / "out"), "parquet").column_names == ["id"]


def test_jsonl_columns_selected_value_that_does_not_fit_is_still_a_bad_row(tmp_path):
    lines = [json.dumps({"id": i, "n": i, "junk": [i]}) for i in range(600)]
    lines.append(json.dumps({"id": 600, "n": "not a number", "junk": "x"}))  # line 601, after the sample
    write_lines(tmp_path / "in/a.jsonl", lines)
    with pytest.raises(InputDataError) as err:
        run_job(tmp_path / "in", tmp_path / "out", columns=["id", "n"])
    assert str(err.value).startswith(f"{tmp_path}/in/a.jsonl: line 601 (shard ")
    assert "column 'n' holds string value 'not a number', which int64 in the job's schema cannot hold unchanged" in str(err.value)
    manifest = run_job(tmp_path / "in", tmp_path / "skip", columns=["id", "n"], bad_rows="skip")
    assert (manifest["rows_out"], manifest["rows_rejected"]) == (600, 1)
    [record] = [json.loads(line) for line in open(next((tmp_path / "skip/_rejected").glob("*.jsonl")))]
    assert (record["line"], json.loads(record["raw"])["n"]) == (601, "not a number")


def test_jsonl_columns_selected_column_absent_behaves_as_for_parquet(tmp_path):
    jsonl(tmp_path / "in/a.jsonl", [{"id": 0, "text": "a"}, {"id": 1}])  # absent in one row
    jsonl(tmp_path / "in/b.jsonl", [{"id": 2, "other": 1}])  # absent in a whole file
    run_job(tmp_path / "in", tmp_path / "out", columns=["id", "text"])
    assert by_id(read_back(str(tmp_path / "out"), "parquet")) == [
        {"id": 0, "text": "a"}, {"id": 1, "text": None}, {"id": 2, "text": None}]
    os.makedirs(tmp_path / "pin")
    pq.write_table(pa.table({"id": [0]}), tmp_path / "pin/a.parquet")
    for source in ("in", "pin"):  # absent everywhere: refused at plan time, in both formats
        with pytest.raises(BatchSpecError, match=r"columns \['nope'\] are not in any input file under"):
            run_job(tmp_path / source, tmp_path / f"{source}-nope", columns=["id", "nope"])


def test_parquet_columns_ignore_unselected_columns_that_do_not_unify(tmp_path):
    os.makedirs(tmp_path / "pin")
    pq.write_table(pa.table({"id": [0], "other": ["x"]}), tmp_path / "pin/a.parquet")
    pq.write_table(pa.table({"id": [1], "other": [1.5]}), tmp_path / "pin/b.parquet")
    run_job(tmp_path / "pin", tmp_path / "pout", columns=["id"])
    assert by_id(read_back(str(tmp_path / "pout"), "parquet")) == [{"id": 0}, {"id": 1}]


# -- issue 19 item 8: an output column null in the first batch ---------------------------------
@pytest.mark.parametrize("sink_format", ["parquet", "jsonl"])
def test_output_column_null_in_the_first_batches_takes_the_type_seen_later_in_the_shard(tmp_path, sink_format):
    jsonl(tmp_path / "in/a.jsonl", [{"id": i} for i in range(100)])
    manifest = run_job(tmp_path / "in", tmp_path / "out", predictor="tests.predictors:SparseNote",
                       batch_size=16, sink_format=sink_format)
    assert manifest["schema"]["columns"] == {"id": "int64", "note": "string"}
    table = read_back(str(tmp_path / "out"), sink_format)
    assert by_id(table) == [{"id": i, "note": f"n{i}" if i >= 50 else None} for i in range(100)]
    if sink_format == "parquet":
        assert table.schema.field("note").type == pa.string()
