"""The commit protocol: what counts as done, and how each broken state is handled."""

from __future__ import annotations

import json
import os

import pyarrow.dataset as ds
import pytest

from airflow_batch_provider.core.domain.commit import check_shard, commit_shard, new_attempt
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.errors import IncompleteJobError, StaleCheckpointError
from airflow_batch_provider.core.execution.runner import ShardRunner
from tests.helpers import make_spec, run_all, run_killed_at, sink_ids


@pytest.fixture
def spec(tmp_path, jsonl_source):
    return make_spec(jsonl_source, str(tmp_path / "out"))


def test_missing_sentinel_means_pending_even_if_part_exists(spec):
    shard = plan_job(spec).pending[0]
    storage = JobStorage.for_spec(spec)
    os.makedirs(spec.sink_root, exist_ok=True)
    open(storage.part_path(shard.shard_id), "wb").write(b"not a committed part")
    assert check_shard(storage, shard).committed is False
    result = ShardRunner(spec).run(shard, new_attempt())
    assert result.status == "computed"  # the unreferenced part was replaced
    assert check_shard(storage, shard).committed


def test_committed_shard_is_skipped_not_recomputed(spec, tmp_path):
    log = tmp_path / "calls"
    spec = make_spec(spec.source, spec.sink, predictor_kwargs={"calls_log": str(log)})
    run_all(spec)
    computed = log.read_text().count("\n")
    runner = ShardRunner(spec)
    statuses = {runner.run(s, new_attempt()).status for s in plan_job(spec).plan.shards}
    assert statuses == {"skipped"}
    assert log.read_text().count("\n") == computed
    assert plan_job(spec).pending == []


def test_partial_part_is_quarantined_and_recomputed(spec):
    run_all(spec)
    storage = JobStorage.for_spec(spec)
    shard = plan_job(spec).plan.shards[0]
    part = storage.part_path(shard.shard_id)
    data = open(part, "rb").read()
    open(part, "wb").write(data[: len(data) // 2])
    # the plan only lists (no GET per committed shard); finalize reads every sentinel
    assert plan_job(spec).pending == []
    with pytest.raises(IncompleteJobError, match="failed validation and were quarantined"):
        finalize_job(spec)
    assert [s.shard_id for s in plan_job(spec).pending] == [shard.shard_id]
    run_all(spec)
    finalize_job(spec)
    assert sink_ids(spec.sink_root) == list(range(380))
    assert os.listdir(os.path.join(spec.checkpoint_root, "quarantine"))


@pytest.mark.parametrize("content", [b"{not json", b"[]", json.dumps({"schema_version": 0}).encode()])
def test_corrupt_sentinel_is_quarantined_not_trusted(spec, content):
    run_all(spec)
    storage = JobStorage.for_spec(spec)
    shard = plan_job(spec).plan.shards[1]
    open(storage.sentinel_path(shard.shard_id), "wb").write(content)
    check = check_shard(storage, shard)
    assert not check.committed and "quarantine" in check.note
    assert ShardRunner(spec).run(shard, new_attempt()).status == "computed"
    finalize_job(spec)
    assert sink_ids(spec.sink_root) == list(range(380))


def test_missing_part_with_sentinel_is_recomputed(spec):
    run_all(spec)
    storage = JobStorage.for_spec(spec)
    shard = plan_job(spec).plan.shards[2]
    os.remove(storage.part_path(shard.shard_id))
    assert [s.shard_id for s in plan_job(spec).pending] == [shard.shard_id]


def test_stale_sentinel_fails_closed_with_what_changed(spec):
    run_all(spec)
    changed = make_spec(spec.source, spec.sink, predictor_kwargs={"factor": 3})
    with pytest.raises(StaleCheckpointError, match=r"predictor_kwargs: \{\} -> \{'factor': 3\}.*resume=False"):
        plan_job(changed)
    with pytest.raises(StaleCheckpointError, match="different spec"):
        check_shard(JobStorage.for_spec(changed), plan_job(spec).plan.shards[0])


def test_stale_sentinels_without_plan_fail_closed(spec):
    run_all(spec)
    os.remove(JobStorage.for_spec(spec).plan_path)
    with pytest.raises(StaleCheckpointError, match="different spec"):
        plan_job(make_spec(spec.source, spec.sink, predictor_kwargs={"factor": 3}))


def test_resume_false_starts_fresh(spec):
    run_all(spec)
    fresh = make_spec(spec.source, spec.sink, predictor_kwargs={"factor": 3}, resume=False)
    job = plan_job(fresh)
    assert len(job.pending) == len(job.plan.shards) and "deleted" in job.notes[0]
    for shard in job.pending:
        ShardRunner(fresh).run(shard, new_attempt())
    finalize_job(fresh)
    table = ds.dataset(spec.sink_root, format="parquet").to_table()
    assert sorted(table.column("id").to_pylist()) == list(range(380))
    assert all(v == i * 0.5 * 3 for i, v in zip(table.column("id").to_pylist(), table.column("value").to_pylist(), strict=True))


def test_racing_attempts_one_wins_loser_discards_only_its_own(spec):
    shard = plan_job(spec).pending[0]
    storage = JobStorage.for_spec(spec)
    # two attempts stage their parts; the first to create the sentinel wins
    stages = []
    for _ in range(2):
        staged = storage.sink.open_staged(storage.part_path(shard.shard_id))
        staged.stream.write(b"x" * (10 + len(stages)))
        staged.finish()
        stages.append(staged)
    won_a, sent_a = commit_shard(storage, shard, stages[0], rows_in=1, rows_out=1, lines=1, attempt=new_attempt())
    won_b, sent_b = commit_shard(storage, shard, stages[1], rows_in=1, rows_out=1, lines=1, attempt=new_attempt())
    assert (won_a, won_b) == (True, False)
    assert sent_b == sent_a  # the loser is told who won
    assert os.path.getsize(storage.part_path(shard.shard_id)) == 10
    assert not os.path.exists(stages[1].handle["staged"])


def test_crash_between_sentinel_and_publish_rolls_forward(spec):
    shard = plan_job(spec).pending[0]
    storage = JobStorage.for_spec(spec)
    staged = storage.sink.open_staged(storage.part_path(shard.shard_id))
    staged.stream.write(b"payload")
    staged.finish()
    sentinel = {"x": 1}
    # create the sentinel but do not publish (what a crash right after the commit leaves)
    from airflow_batch_provider.core.domain import commit as commit_mod

    won = storage.checkpoint.create_exclusive(
        storage.sentinel_path(shard.shard_id),
        json.dumps({**sentinel, "schema_version": 1, "shard_id": shard.shard_id, "bytes": 7, "rows_out": 0,
                    "spec_fingerprint": spec.fingerprint, "input_fingerprint": shard.input_fingerprint,
                    "staged": staged.handle}).encode(),
    )
    assert won and commit_mod.SENTINEL_SCHEMA_VERSION == 1
    assert not os.path.exists(storage.part_path(shard.shard_id))
    assert check_shard(storage, shard).committed
    assert open(storage.part_path(shard.shard_id), "rb").read() == b"payload"


@pytest.mark.parametrize("point", ["mid_part", "before_sentinel", "before_publish", "after_publish"])
def test_sigkill_at_each_commit_step_then_rerun_leaves_each_row_once(spec, tmp_path, point):
    marker = tmp_path / f"{point}.fired"
    proc = run_killed_at(spec, point, marker)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert marker.exists()
    ids = sink_ids(spec.sink_root)
    assert len(ids) == len(set(ids))  # even mid-crash, readers never see a row twice
    run_all(spec)  # the rerun
    manifest = finalize_job(spec, orphan_grace_s=0)  # the killed attempt's staged part is an orphan now
    assert sink_ids(spec.sink_root) == list(range(380))
    assert manifest["rows_out"] == 380
    assert not os.listdir(os.path.join(spec.sink_root, "_staging"))


def test_finalize_refuses_incomplete_job_and_names_the_shards(spec):
    job = plan_job(spec)
    ShardRunner(spec).run(job.pending[0], new_attempt())
    with pytest.raises(IncompleteJobError, match=r"4 shard\(s\) .* have no sentinel.*Clear the failed shard"):
        finalize_job(spec)


def test_finalize_refuses_stray_part_files(spec):
    run_all(spec)
    open(os.path.join(spec.sink_root, "part-deadbeef.parquet"), "wb").write(b"x")
    with pytest.raises(IncompleteJobError, match="no shard of this plan committed"):
        finalize_job(spec)


def test_manifest_lists_parts_with_counts_and_checksums(spec):
    run_all(spec)
    manifest = finalize_job(spec)
    assert manifest["shards"] == 5 and manifest["rows_in"] == 380
    assert {p["part"] for p in manifest["parts"]} == {n for n in os.listdir(spec.sink_root) if n.startswith("part-")}
    assert all(len(p["sha256"]) == 64 for p in manifest["parts"])
    assert json.load(open(os.path.join(spec.sink_root, "_SUCCESS")))["spec_fingerprint"] == spec.fingerprint
