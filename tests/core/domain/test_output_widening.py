"""An output column of type null in the recorded output schema takes the type of its values
(issue 19 item 8): a sparse column (an error or note field) null in every row of the first
shard that commits no longer fails every later shard holding a value.

Each case runs a real job (plan, every shard through a ShardRunner, finalize), reads the sink
back with pyarrow.dataset, pandas and DuckDB (``read_back``), counts the rows the predictor
computed from its call log, and checks the sink with ``verify_sink``.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_batch_provider.core import failpoints
from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.inspection import verify_sink
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.errors import InputDataError
from airflow_batch_provider.core.execution.runner import ShardRunner
from airflow_batch_provider.core.spec import JobSpec
from tests.corpus.readback import read_back
from tests.helpers import make_spec, parquet_bytes, put, run_killed_at, write_parquet

ROWS = 380  # jsonl_source: ids 0..379 in a.jsonl (250) and b.jsonl (130); 5 shards of <= 100 rows
TEXT = (250, 350)  # the 4th shard (b.jsonl's first) is the only one with a note


def note_spec(tmp_path, source, sink_format="parquet", **predictor_kwargs) -> JobSpec:
    kwargs = {"text_from": TEXT[0], "text_to": TEXT[1], "calls_log": str(tmp_path / "calls"), **predictor_kwargs}
    return make_spec(source, str(tmp_path / "out"), predictor="tests.predictors:NoteInRange", sink_format=sink_format, predictor_kwargs=kwargs)


def run(spec: JobSpec, order: str = "forward") -> dict:
    job = plan_job(spec)
    shards = job.pending if order == "forward" else job.pending[::-1]
    runner = ShardRunner(spec)
    for shard in shards:
        runner.run(shard, new_attempt())
    return finalize_job(spec, orphan_grace_s=0)


def computed_ids(spec: JobSpec) -> list[int]:
    path = spec.predictor_kwargs["calls_log"]
    return sorted(i for line in open(path) for i in json.loads(line)) if os.path.exists(path) else []


def expected_rows() -> list[dict]:
    return [{"id": i, "note": f"n{i}" if TEXT[0] <= i < TEXT[1] else None} for i in range(ROWS)]


def assert_one_string_dataset(spec: JobSpec, manifest: dict) -> None:
    """Every reader reads every row once, ``note`` typed string; every part agrees; the sink verifies clean."""
    assert manifest["schema"]["columns"] == {"id": "int64", "note": "string"}
    table = read_back(spec.sink_root, spec.sink_format)
    assert sorted(table.to_pylist(), key=lambda r: r["id"]) == expected_rows()
    if spec.sink_format == "parquet":
        assert table.schema.field("note").type == pa.string()
        parts = [n for n in os.listdir(spec.sink_root) if n.startswith("part-")]
        assert {str(pq.read_schema(os.path.join(spec.sink_root, n)).field("note").type) for n in parts} == {"string"}
    assert verify_sink(spec.sink_root).problems == []
    assert manifest["rows_out"] == ROWS


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_a_column_null_in_the_whole_first_shard_takes_the_type_a_later_shard_shows(tmp_path, jsonl_source, order):
    spec = note_spec(tmp_path, jsonl_source)
    manifest = run(spec, order)
    assert_one_string_dataset(spec, manifest)
    # the parts committed with note as type null were re-typed by finalize, not by the model
    assert computed_ids(spec) == list(range(ROWS))
    storage = JobStorage.for_spec(spec)
    retyped = [json.loads(storage.checkpoint.read_bytes(storage.sentinel_path(s))) for s in sorted(storage.committed_ids())]
    assert sum(1 for s in retyped if s.get("retyped")) == (3 if order == "forward" else 1)
    assert all(s["null_columns"] == [] for s in retyped)


def test_a_jsonl_sink_records_the_widened_schema(tmp_path, jsonl_source):
    """JSON carries no types: the parts are not re-typed, _SUCCESS records note as string.
    DuckDB and pandas read the parts as they are; pyarrow.dataset infers a JSON dataset's
    schema from its first file (all null here), so it is given _SUCCESS's schema."""
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    from airflow_batch_provider.core.domain.schema.arrow_types import schema_from_json

    spec = note_spec(tmp_path, jsonl_source, sink_format="jsonl")
    manifest = run(spec)
    assert manifest["schema"]["columns"] == {"id": "int64", "note": "string"}
    parts = sorted(os.path.join(spec.sink_root, n) for n in os.listdir(spec.sink_root) if n.startswith("part-"))
    table = ds.dataset(parts, format="json", schema=schema_from_json(manifest["schema"])).to_table()
    assert sorted(table.to_pylist(), key=lambda r: r["id"]) == expected_rows()
    rows = duckdb.sql(f"select id, note from read_json('{spec.sink_root}/part-*.jsonl', format='newline_delimited') order by id")
    assert [{"id": i, "note": n} for i, n in rows.fetchall()] == expected_rows()
    frame = pd.concat([pd.read_json(p, lines=True) for p in parts]).sort_values("id")
    assert [n if isinstance(n, str) else None for n in frame["note"]] == [r["note"] for r in expected_rows()]
    assert verify_sink(spec.sink_root).problems == []
    assert computed_ids(spec) == list(range(ROWS))


def test_a_column_null_in_the_first_row_group_of_a_shard_is_written_again_with_its_type(tmp_path):
    """One shard: note null in its first row group's worth (65,536 rows), text after. The part
    had written note as null: the uncommitted shard is written again, note typed string."""
    rows = 66_000
    write_parquet(str(tmp_path / "in/a.parquet"), [{"id": i} for i in range(rows)], row_group_size=10_000)
    spec = JobSpec(source=str(tmp_path / "in"), sink=str(tmp_path / "out"), predictor="tests.predictors:NoteInRange",
                     source_format="parquet", rows_per_shard=100_000, batch_size=4096,
                     predictor_kwargs={"text_from": 65_600, "text_to": rows, "calls_log": str(tmp_path / "calls")})
    manifest = run(spec)
    assert manifest["schema"]["columns"] == {"id": "int64", "note": "string"}
    table = pq.read_table(spec.sink_root)
    assert table.schema.field("note").type == pa.string()
    assert table.column("note").null_count == 65_600 and table.num_rows == rows
    assert len(computed_ids(spec)) <= 2 * rows  # only the uncommitted shard is computed again
    assert verify_sink(spec.sink_root).problems == []


@pytest.mark.parametrize("point", [*failpoints.RETYPE_POINTS, "finalize_before_manifest"])
def test_sigkill_while_finalize_retypes_then_rerun_leaves_each_row_once(tmp_path, jsonl_source, point):
    spec = note_spec(tmp_path, jsonl_source)
    marker = tmp_path / "fired"
    proc = run_killed_at(spec, point, marker)
    assert proc.returncode == -9 and marker.exists(), proc.stderr.decode()[-3000:]
    during = pq.read_table(spec.sink_root, columns=["id"]).column("id").to_pylist()
    assert sorted(during) == list(range(ROWS))  # right after the crash: every row once, none lost
    manifest = run(spec)  # the rerun: plan, every shard (all committed), finalize
    assert_one_string_dataset(spec, manifest)
    assert computed_ids(spec) == list(range(ROWS))  # no committed row computed again
    assert JobStorage.for_spec(spec).staged_parts() == []


def test_values_of_two_types_in_a_column_null_in_the_first_shard_still_fail_naming_both(tmp_path, jsonl_source):
    spec = note_spec(tmp_path, jsonl_source, text_from=350, text_to=ROWS, int_from=250, int_to=350)
    with pytest.raises(InputDataError, match=r"column 'note' holds string value 'n350', which int64 in the job's output schema"):
        run(spec)


def test_parts_on_s3_are_retyped_too(s3_server, tmp_path):
    """The same job on S3: finalize re-types parts through the S3 store's staging (multipart)."""
    import io

    from airflow_batch_provider.core.api import finalize, plan

    bucket = s3_server.new_bucket()
    put(s3_server, bucket, "in/a.parquet", parquet_bytes(range(300)))
    options = s3_server.storage_options()
    spec = JobSpec(source=f"s3://{bucket}/in/", sink=f"s3://{bucket}/out", predictor="tests.predictors:NoteInRange",
                     source_format="parquet", rows_per_shard=100,
                     predictor_kwargs={"text_from": 200, "text_to": 300, "calls_log": str(tmp_path / "calls")})
    runner = ShardRunner(spec, options)
    for shard in plan(spec, options).pending:
        runner.run(shard, new_attempt())
    manifest = finalize(spec, options)
    assert manifest["schema"]["columns"] == {"id": "int64", "note": "string"}
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/part-")["Contents"]]
    tables = [pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=k)["Body"].read())) for k in keys]
    assert {str(t.schema.field("note").type) for t in tables} == {"string"}
    rows = sorted((r for t in tables for r in t.to_pylist()), key=lambda r: r["id"])
    assert rows == [{"id": i, "note": f"n{i}" if i >= 200 else None} for i in range(300)]
    assert computed_ids(spec) == list(range(300))
    assert verify_sink(spec.sink_root, storage_options=options).problems == []
