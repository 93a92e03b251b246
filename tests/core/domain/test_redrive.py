"""Re-drive: the rows committed shards rejected, computed again after the predictor is fixed."""

from __future__ import annotations

import dataclasses
import json
import os

import pyarrow.dataset as ds
import pytest

from airflow_batch_provider.core import failpoints
from airflow_batch_provider.core.domain.commit import check_shard, new_attempt
from airflow_batch_provider.core.domain.inspection import sink_status, verify_sink
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.execution.runner import ShardRunner
from airflow_batch_provider.core.spec import JobSpec
from tests.helpers import make_spec, run_all, run_killed_at, sink_ids, two_runs_at_once

ROWS = 380  # the jsonl_source fixture: ids 0..379
BAD = [i for i in range(ROWS) if i % 97 == 0]  # 0, 97, 194, 291
FILES = 3  # shards of 100 lines: 0 and 97 share one


@pytest.fixture
def broken(tmp_path, jsonl_source):
    """A job whose predictor raised on every id divisible by 97 (rejected under "skip"), and the
    marker file whose removal "fixes" the predictor (it is not part of the fingerprint)."""
    marker = tmp_path / "predictor-broken"
    marker.touch()
    spec = make_spec(jsonl_source, str(tmp_path / "out"), bad_rows="skip", batch_size=16,
                     predictor_kwargs={"fail_marker": str(marker), "fail_mod": 97, "calls_log": str(tmp_path / "calls")})
    run_all(spec)
    manifest = finalize_job(spec)
    assert manifest["rows_rejected"] == len(BAD) and manifest["rows_out"] == ROWS - len(BAD)
    return spec, marker


def redrive_spec(spec: JobSpec) -> JobSpec:
    return dataclasses.replace(spec, redrive_rejected=True)


def rejected_lines(spec: JobSpec) -> list[dict]:
    folder = os.path.join(spec.sink_root, "_rejected")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".jsonl")) if os.path.isdir(folder) else []
    return [json.loads(line) for n in names for line in open(os.path.join(folder, n)) if line.strip()]


def run_redrive(spec: JobSpec) -> dict:
    spec = redrive_spec(spec)
    run_all(spec)
    return finalize_job(spec, orphan_grace_s=0)


def test_redrive_computes_each_rejected_row_once_and_retires_the_files(broken):
    spec, marker = broken
    storage = JobStorage.for_spec(spec)
    units = [u for u in plan_job(redrive_spec(spec), storage).pending]
    assert sorted(u.rows for u in units) == [1, 1, 2]  # one unit per rejected file
    assert all(u.shard_id.endswith("-r1") and u.redrive["retires"]["name"] == f"{u.base_id}.jsonl" for u in units)
    assert plan_job(spec, storage).pending == []  # without the option: nothing to do

    marker.unlink()  # the fix
    manifest = run_redrive(spec)

    assert sink_ids(spec.sink_root) == list(range(ROWS))  # every row once
    assert rejected_lines(spec) == []
    retired = sorted(os.listdir(os.path.join(spec.sink_root, "_rejected", "_retired")))
    assert retired == sorted(f"{u.base_id}.jsonl" for u in units)
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (ROWS, ROWS, 0)
    assert manifest["rows_redriven"] == len(BAD) and manifest["redrives"] == FILES
    redriven = [p for p in manifest["parts"] if p.get("redrive_of")]
    assert sorted(p["part"] for p in redriven) == sorted(f"part-{u.base_id}-r1.parquet" for u in units)
    assert sum(1 for p in manifest["parts"] if p.get("rejected_retired")) == FILES
    # one dataset for every reader: pyarrow.dataset and a part-* glob see the same rows
    assert ds.dataset(spec.sink_root, format="parquet").count_rows() == ROWS
    # nothing left to re-drive; the shards stay committed (no quarantine of retired files)
    assert plan_job(redrive_spec(spec)).pending == []
    assert all(check_shard(storage, s).committed for s in plan_job(spec).plan.shards)
    status = sink_status(spec.sink_root)
    assert status.problems == [] and verify_sink(spec.sink_root).problems == []
    assert (status.rows_out, status.rows_rejected, status.rows_redriven) == (ROWS, 0, len(BAD))


def test_rows_that_still_fail_go_to_a_new_rejected_file_and_the_next_redrive_takes_them(broken, tmp_path):
    spec, marker = broken
    manifest = run_redrive(spec)  # predictor not fixed: every row fails again
    assert (manifest["rows_out"], manifest["rows_rejected"]) == (ROWS - len(BAD), len(BAD))
    names = sorted(os.listdir(os.path.join(spec.sink_root, "_rejected")))
    assert all(n.endswith("-r1.jsonl") for n in names if n.endswith(".jsonl"))
    assert sorted(r["line"] for r in rejected_lines(spec)) == sorted(i + 1 if i < 250 else i - 249 for i in BAD)
    assert sink_status(spec.sink_root).problems == []

    marker.unlink()
    units = plan_job(redrive_spec(spec)).pending
    assert {u.shard_id.rsplit("-", 1)[1] for u in units} == {"r2"}
    manifest = run_redrive(spec)
    assert sink_ids(spec.sink_root) == list(range(ROWS))
    assert (manifest["rows_out"], manifest["rows_rejected"], manifest["redrives"]) == (ROWS, 0, 2 * FILES)
    assert rejected_lines(spec) == []


def test_unreadable_rows_stay_rejected_and_are_not_redriven(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text('{"id": 0, "value": 0.0}\n{"id": 1, "value": \n{"id": 2, "value": 1.0}\n')
    spec = make_spec(str(src), str(tmp_path / "out"), bad_rows="skip", input_schema={"id": "int64", "value": "float64"})
    run_all(spec)
    finalize_job(spec)
    job = plan_job(redrive_spec(spec))
    assert job.pending == [] and any("could not be read from the input and stay rejected" in n for n in job.notes)
    assert [r["line"] for r in rejected_lines(spec)] == [2]


def test_redrive_with_nothing_rejected_is_a_no_op_plan(tmp_path, jsonl_source):
    spec = make_spec(jsonl_source, str(tmp_path / "out"))
    run_all(spec)
    finalize_job(spec)
    job = plan_job(redrive_spec(spec))
    assert job.pending == [] and "re-drive: no rejected rows to compute again" in job.notes


def test_a_committed_redrive_is_never_computed_again(broken, tmp_path):
    spec, marker = broken
    marker.unlink()
    units = plan_job(redrive_spec(spec)).pending
    runner = ShardRunner(redrive_spec(spec))
    assert {runner.run(u, new_attempt()).status for u in units} == {"computed"}
    calls = (tmp_path / "calls").read_text().count("\n")
    assert {runner.run(u, new_attempt()).status for u in units} == {"skipped"}  # the same units again (a retried task)
    assert (tmp_path / "calls").read_text().count("\n") == calls


def test_a_recomputed_shard_withdraws_its_stale_redrives(broken):
    """A shard quarantined and computed again after its re-drive (healthy now: it rejects
    nothing) holds every row in its own part: the re-drive's part would be a second copy."""
    spec, marker = broken
    marker.unlink()
    run_redrive(spec)
    storage = JobStorage.for_spec(spec)
    shard = next(s for s in plan_job(spec).plan.shards if s.start == 0 and s.relpath == "a.jsonl")  # holds id 0
    part = storage.part_path(shard.shard_id)
    open(part, "ab").write(b"x")  # damaged: quarantined, computed again
    assert not check_shard(storage, shard).committed
    run_all(spec)
    assert sink_ids(spec.sink_root) == list(range(ROWS))  # withdrawn by the recompute, before finalize
    assert not os.path.exists(storage.part_path(f"{shard.shard_id}-r1"))
    manifest = finalize_job(spec, orphan_grace_s=0)
    assert manifest["rows_out"] == ROWS and manifest["redrives"] == FILES - 1


def test_reset_removes_redrives_and_retired_files(broken):
    spec, marker = broken
    marker.unlink()
    run_redrive(spec)
    storage = JobStorage.for_spec(spec)
    plan_job(dataclasses.replace(spec, resume=False), storage)
    assert storage.redrive_sentinel_files() == {}
    assert not [n for n in os.listdir(spec.sink_root) if n.startswith("part-")]
    assert not storage.sink.list_files(storage.retired_dir)


@pytest.mark.slow
@pytest.mark.parametrize("point", failpoints.REDRIVE_POINTS)
def test_sigkill_at_each_redrive_commit_point_then_rerun_leaves_every_row_once(broken, point, tmp_path):
    spec, marker = broken
    marker.unlink()
    fired = tmp_path / "fired"
    proc = run_killed_at(redrive_spec(spec), point, fired)
    assert proc.returncode == -9 and fired.exists(), proc.stderr.decode()[-3000:]
    during = sink_ids(spec.sink_root)
    assert len(during) == len(set(during)), "a reader saw a row twice right after the crash"
    # an ordinary run's finalize (no re-drive) rolls a committed re-drive forward and counts it
    manifest = finalize_job(spec, orphan_grace_s=0)
    assert manifest["rows_out"] + manifest["rows_rejected"] == ROWS == len(sink_ids(spec.sink_root)) + len(rejected_lines(spec))
    assert manifest["redrives"] == (0 if point == "redrive_before_sentinel" else 1)

    manifest = run_redrive(spec)
    assert sink_ids(spec.sink_root) == list(range(ROWS))
    assert rejected_lines(spec) == []  # no rejected record left, none twice
    retired = os.listdir(os.path.join(spec.sink_root, "_rejected", "_retired"))
    assert len(retired) == FILES
    assert (manifest["rows_out"], manifest["rows_rejected"], manifest["redrives"]) == (ROWS, 0, FILES)
    assert JobStorage.for_spec(spec).staged_parts() == []
    assert sink_status(spec.sink_root).problems == []


def test_bad_rows_fail_makes_a_redrive_all_or_nothing(broken):
    spec, marker = broken  # still broken
    strict = dataclasses.replace(redrive_spec(spec), bad_rows="fail")
    unit = plan_job(strict).pending[0]
    with pytest.raises(Exception, match="injected failure"):
        ShardRunner(strict).run(unit, new_attempt())
    assert JobStorage.for_spec(spec).redrive_sentinel_files() == {}


@pytest.mark.slow
def test_redrive_on_s3_of_parquet_rows_killed_before_retire(s3_server, s3_bucket, tmp_path):
    """Parquet input (rows named by row index, values rebuilt with their Arrow types) on S3,
    where a retire is a PUT then a DELETE: killed between the commit and the retire, the next
    run rolls the retire forward and computes nothing twice."""
    import io

    import pyarrow.parquet as pq

    from tests.helpers import parquet_bytes, put

    put(s3_server, s3_bucket, "in/a.parquet", parquet_bytes(range(300)))
    options = s3_server.storage_options()
    marker = tmp_path / "broken"
    marker.touch()
    calls = tmp_path / "calls"
    spec = JobSpec(source=f"s3://{s3_bucket}/in/", source_format="parquet", sink=f"s3://{s3_bucket}/out",
                   predictor="tests.predictors:Doubler", rows_per_shard=100, bad_rows="skip",
                   predictor_kwargs={"fail_marker": str(marker), "fail_mod": 97, "calls_log": str(calls)})
    storage = JobStorage.for_spec(spec, options)
    run_all(spec, options)
    assert finalize_job(spec, storage)["rows_rejected"] == 4  # 0, 97, 194, 291
    marker.unlink()
    fired = tmp_path / "fired"
    proc = run_killed_at(redrive_spec(spec), "redrive_before_retire", fired, options)
    assert proc.returncode == -9 and fired.exists(), proc.stderr.decode()[-3000:]
    calls.write_text("")

    again = redrive_spec(spec)
    run_all(again, options)
    manifest = finalize_job(again, storage, orphan_grace_s=0)

    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="out/").get("Contents", [])]
    tables = [pq.read_table(io.BytesIO(client.get_object(Bucket=s3_bucket, Key=k)["Body"].read()))
              for k in keys if k.startswith("out/part-")]
    ids = sorted(i for t in tables for i in t.column("id").to_pylist())
    assert ids == list(range(300)) and len({t.schema for t in tables}) == 1  # one schema, every row once
    assert not [k for k in keys if k.startswith("out/_rejected/") and "/_retired/" not in k]
    assert len([k for k in keys if "/_rejected/_retired/" in k]) == 3
    assert (manifest["rows_out"], manifest["rows_rejected"]) == (300, 0)
    # only the re-drives not committed before the kill were computed in the rerun
    assert sum(len(json.loads(line)) for line in calls.read_text().splitlines()) <= 3
    assert sink_status(spec.sink, None, options).problems == []


def test_two_redrive_runs_at_once_commit_each_unit_once(broken):
    spec, marker = broken
    marker.unlink()
    results = two_runs_at_once(redrive_spec(spec))
    statuses = sorted(s for run, _ in results for s in run)
    assert statuses.count("computed") + statuses.count("lost_race") + statuses.count("skipped") == 2 * FILES
    assert statuses.count("computed") == FILES
    assert [rows_out for _, rows_out in results] == [ROWS, ROWS]
    assert sink_ids(spec.sink_root) == list(range(ROWS)) and rejected_lines(spec) == []
