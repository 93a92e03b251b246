from __future__ import annotations

import dataclasses
import os
import shutil

import pytest

from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import plan_job
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.domain.planning import list_inputs, split_file
from airflow_batch_provider.core.domain.schema.input import load_input_schema
from airflow_batch_provider.core.errors import BatchSpecError, StaleCheckpointError
from airflow_batch_provider.core.execution.readers import ReadStats, read_shard
from airflow_batch_provider.core.execution.runner import ShardRunner
from airflow_batch_provider.core.spec import JobSpec
from tests.helpers import make_spec, rows, write_jsonl


def read_ids(spec, shards):
    """The ids the shards' rows hold, read as a shard task reads them: in the plan's input schema."""
    storage = JobStorage.for_spec(spec)
    schema = load_input_schema(storage)
    ids = []
    for shard in shards:
        for batch in read_shard(storage.source, spec, shard, ReadStats(), schema):
            ids.extend(batch.table.column("id").to_pylist())
    return ids


@pytest.mark.parametrize("source_fixture", ["jsonl_source", "parquet_source"])
def test_ranges_cover_each_row_exactly_once(request, tmp_path, source_fixture):
    source = request.getfixturevalue(source_fixture)
    spec = make_spec(source, str(tmp_path / "out"))
    plan = plan_job(spec).plan
    ids = read_ids(spec, plan.shards)
    assert sorted(ids) == list(range(len(ids)))
    assert plan.total_rows == len(ids)
    assert all(s.rows <= 100 for s in plan.shards)


def test_jsonl_shards_have_byte_ranges_and_blank_lines_are_not_rows(tmp_path):
    path = str(tmp_path / "in" / "x.jsonl")
    write_jsonl(path, rows(10))
    with open(path, "a") as handle:
        handle.write("\n\n" + '{"id": 10, "value": 1.0, "text": "t"}\n')
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), rows_per_shard=4)
    shards = plan_job(spec).plan.shards
    assert [(s.start, s.end) for s in shards] == [(0, 4), (4, 8), (8, 12), (12, 13)]
    assert shards[0].byte_start == 0 and shards[1].byte_start == shards[0].byte_end
    assert sorted(read_ids(spec, shards)) == list(range(11))


def test_a_shard_of_a_plan_without_its_input_schema_asks_to_plan_again(tmp_path, jsonl_source):
    """A plan written before input schemas were settled has none: its shards are read in the
    plan's input schema only, so the shard asks for the plan task again (which writes it)."""
    spec = make_spec(jsonl_source, str(tmp_path / "out"))
    plan = plan_job(spec).plan
    storage = JobStorage.for_spec(spec)
    old = dataclasses.replace(plan, input_schema=None, file_schemas={})  # as such a plan was written
    storage.checkpoint.write_atomic(storage.plan_path, old.to_json())
    storage.checkpoint.delete(storage.input_schema_path)
    shard = plan.shards[0]
    with pytest.raises(StaleCheckpointError, match="Run the plan task again"):
        ShardRunner(spec).run(shard, new_attempt())
    plan_job(spec)
    assert ShardRunner(spec).run(shard, new_attempt()).status == "computed"


def test_shard_ids_stable_when_files_added_or_listed_in_another_order(tmp_path, jsonl_source):
    spec = make_spec(jsonl_source, str(tmp_path / "out"))
    before = {s.shard_id for s in plan_job(spec).plan.shards}
    write_jsonl(os.path.join(jsonl_source, "0-new.jsonl"), rows(50, start=1000))  # sorts first
    after = plan_job(spec).plan.shards
    assert before < {s.shard_id for s in after}
    assert len(after) == len(before) + 1


def test_shard_ids_change_when_a_file_is_edited_in_place(tmp_path):
    path = write_jsonl(str(tmp_path / "in" / "a.jsonl"), rows(20))
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), rows_per_shard=10)
    storage = JobStorage.for_spec(spec)
    first = split_file(storage.source, spec, list_inputs(storage.source, spec)[0])
    write_jsonl(path, rows(21))
    second = split_file(storage.source, spec, list_inputs(storage.source, spec)[0])
    assert {s.shard_id for s in first}.isdisjoint({s.shard_id for s in second})


def test_parquet_shards_follow_row_groups(tmp_path, parquet_source):
    spec = make_spec(parquet_source, str(tmp_path / "out"), rows_per_shard=120)
    shards = plan_job(spec).plan.shards
    a = [(s.start, s.end, s.rows) for s in shards if s.relpath == "a.parquet"]
    assert a == [(0, 2, 100), (2, 4, 100), (4, 6, 100)]  # 50-row groups, 2 per shard


def test_plan_is_persisted_once_and_reused(tmp_path, jsonl_source):
    spec = make_spec(jsonl_source, str(tmp_path / "out"))
    first = plan_job(spec)
    second = plan_job(spec)
    assert first.plan_written and not second.plan_written
    assert os.path.exists(JobStorage.for_spec(spec).plan_path)


def test_glob_and_single_file_sources(tmp_path, jsonl_source):
    out = str(tmp_path / "out")
    assert {s.relpath for s in plan_job(make_spec(f"{jsonl_source}/a*.jsonl", out)).plan.shards} == {"a.jsonl"}
    single = make_spec(f"{jsonl_source}/b.jsonl", str(tmp_path / "out2"))
    assert {s.relpath for s in plan_job(single).plan.shards} == {"b.jsonl"}


def test_missing_source_is_a_clear_error(tmp_path):
    spec = make_spec(str(tmp_path / "nope" / "x.jsonl"), str(tmp_path / "out"))
    with pytest.raises(BatchSpecError, match="does not exist"):
        plan_job(spec)


def test_empty_directory_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "empty")
    spec = JobSpec(source=str(tmp_path / "empty"), source_format="jsonl", sink=str(tmp_path / "o"), predictor="a:B")
    with pytest.raises(BatchSpecError, match="matched no jsonl input files"):
        plan_job(spec)


def test_rows_per_shard_change_after_commits_fails_closed(tmp_path, jsonl_source):
    from airflow_batch_provider.core.domain.commit import new_attempt
    from airflow_batch_provider.core.execution.runner import ShardRunner

    spec = make_spec(jsonl_source, str(tmp_path / "out"))
    job = plan_job(spec)
    ShardRunner(spec).run(job.pending[0], new_attempt())
    with pytest.raises(StaleCheckpointError, match="rows_per_shard changed from 100 to 50"):
        plan_job(make_spec(jsonl_source, str(tmp_path / "out"), rows_per_shard=50))


def test_edited_input_with_committed_shards_fails_closed(tmp_path, jsonl_source):
    from airflow_batch_provider.core.domain.commit import new_attempt
    from airflow_batch_provider.core.execution.runner import ShardRunner

    spec = make_spec(jsonl_source, str(tmp_path / "out"))
    job = plan_job(spec)
    for shard in job.pending:
        ShardRunner(spec).run(shard, new_attempt())
    write_jsonl(os.path.join(jsonl_source, "a.jsonl"), rows(251))
    with pytest.raises(StaleCheckpointError, match="a.jsonl changed"):
        plan_job(spec)
    os.remove(os.path.join(jsonl_source, "a.jsonl"))
    with pytest.raises(StaleCheckpointError, match="a.jsonl was removed"):
        plan_job(spec)
    shutil.rmtree(tmp_path / "out")
