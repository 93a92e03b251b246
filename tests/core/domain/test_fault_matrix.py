"""The fault matrix: a SIGKILL at every crash point x {local disk, S3}, then a rerun.

Each scenario runs a whole job (plan, every shard, finalize) in a child process that kills
itself at the point, then reruns the job and counts, from the sink as a reader sees it and
from the predictor's call log: rows lost, rows duplicated, rows recomputed. Sync and
deferrable shard tasks run the same core code in the Ray replica (deferral only changes
which Airflow process waits), so the crash points do not differ between them here; the
Airflow side of a killed replica is in tests/integration and tests/operators.
Set ``ABP_MATRIX_OUT`` to a file to collect the figures as JSON lines.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from airflow_batch_provider.core import failpoints
from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.execution.runner import ShardRunner
from airflow_batch_provider.core.spec import JobSpec
from tests.helpers import parquet_bytes, put, run_killed_at

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(params=["local", "s3"])
def job(request, tmp_path, jsonl_source):
    """(where, spec, storage options, rows in the input, ids a reader of the sink sees)."""
    calls = {"calls_log": str(tmp_path / "calls")}
    if request.param == "local":
        spec = JobSpec(source=jsonl_source, sink=str(tmp_path / "out"), predictor="tests.predictors:Doubler",
                         source_format="jsonl", rows_per_shard=100, predictor_kwargs=calls)

        def read_ids():
            parts = [n for n in os.listdir(spec.sink_root) if n.startswith("part-")] if os.path.isdir(spec.sink_root) else []
            return ds.dataset(spec.sink_root, format="parquet").to_table(columns=["id"]).column("id").to_pylist() if parts else []

        def read_rejected():
            folder = os.path.join(spec.sink_root, "_rejected")
            names = sorted(n for n in os.listdir(folder) if n.endswith(".jsonl")) if os.path.isdir(folder) else []
            return sum(open(os.path.join(folder, n), "rb").read().count(b"\n") for n in names)

        return "local", spec, None, 380, read_ids, read_rejected
    s3_server = request.getfixturevalue("s3_server")
    bucket = s3_server.new_bucket()
    put(s3_server, bucket, "in/a.parquet", parquet_bytes(range(300)))
    put(s3_server, bucket, "in/b.parquet", parquet_bytes(range(300, 420)))
    spec = JobSpec(source=f"s3://{bucket}/in/", sink=f"s3://{bucket}/out", predictor="tests.predictors:Doubler",
                     source_format="parquet", rows_per_shard=100, predictor_kwargs=calls)

    def read_s3_ids():
        """Every part a reader lists now, read whole (a fresh client: no listing cached from before)."""
        client = s3_server.client()
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/part-").get("Contents", [])]
        ids = []
        for key in keys:
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            ids += pq.read_table(io.BytesIO(body), columns=["id"]).column("id").to_pylist()
        return ids

    def read_s3_rejected():
        client = s3_server.client()
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/_rejected/").get("Contents", [])]
        return sum(client.get_object(Bucket=bucket, Key=k)["Body"].read().count(b"\n") for k in keys)

    return "s3", spec, s3_server.storage_options(), 420, read_s3_ids, read_s3_rejected


def rejecting_spec(spec: JobSpec, tmp_path) -> JobSpec:
    """``spec`` under bad_rows="skip", with a predictor that rejects every id divisible by 97."""
    always = tmp_path / "reject-while-this-exists"
    always.touch()
    kwargs = {**spec.predictor_kwargs, "fail_marker": str(always), "fail_mod": 97}
    return dataclasses.replace(spec, bad_rows="skip", predictor_kwargs=kwargs)


def calls_of_an_uninterrupted_run(spec: JobSpec, options, tmp_path) -> int:
    """Rows the predictor computes in a run without a crash (isolating rejected rows calls
    it more than once per row): the baseline for rows recomputed."""
    clean = dataclasses.replace(spec, sink=spec.sink_root + "-baseline",
                                predictor_kwargs={**spec.predictor_kwargs, "calls_log": str(tmp_path / "baseline-calls")})
    storage = JobStorage.for_spec(clean, options)
    runner = ShardRunner(clean, options)
    for shard in plan_job(clean, storage).pending:
        runner.run(shard, new_attempt())
    return computed_rows(clean)


def computed_rows(spec: JobSpec) -> int:
    path = spec.predictor_kwargs["calls_log"]
    return sum(len(json.loads(line)) for line in open(path)) if os.path.exists(path) else 0


def staged_leftovers(storage: JobStorage) -> int:
    return len(storage.staged_parts())


@pytest.mark.parametrize("point", failpoints.POINTS)
def test_sigkill_at_each_point_then_rerun_leaves_every_row_once(job, point, tmp_path):
    where, spec, options, rows, read_ids, read_rejected = job
    rejecting = point == "before_publish_rejected"
    baseline = rows
    if rejecting:  # the point lies on the path of a shard with rejected rows (bad_rows="skip")
        spec = rejecting_spec(spec, tmp_path)
        baseline = calls_of_an_uninterrupted_run(spec, options, tmp_path)
    expected = [i for i in range(rows) if not (rejecting and i % 97 == 0)]
    marker = tmp_path / "fired"
    proc = run_killed_at(spec, point, marker, options)
    assert proc.returncode == -9 and marker.exists(), proc.stderr.decode()[-3000:]
    during = read_ids()
    assert len(during) == len(set(during)), "a reader saw a row twice right after the crash"

    storage = JobStorage.for_spec(spec, options)
    rerun = plan_job(spec, storage)
    runner = ShardRunner(spec, options)
    for shard in rerun.pending:
        runner.run(shard, new_attempt())
    manifest = finalize_job(spec, storage, orphan_grace_s=0)

    ids = read_ids()
    rejected = read_rejected()
    figures = {
        "store": where, "point": point, "rows": rows,
        "rows_lost": len(expected) - len(set(ids)) + (rows - len(expected)) - rejected if rejecting else rows - len(set(ids)),
        "rows_duplicated": len(ids) - len(set(ids)) + max(0, rejected - (rows - len(expected))),
        "rows_recomputed": computed_rows(spec) - baseline,
        "rows_rejected": rejected,
        "shards_pending_in_rerun": len(rerun.pending),
    }
    print(json.dumps(figures))
    if os.environ.get("ABP_MATRIX_OUT"):
        with open(os.environ["ABP_MATRIX_OUT"], "a") as out:
            out.write(json.dumps(figures) + "\n")
    assert (figures["rows_lost"], figures["rows_duplicated"]) == (0, 0)
    assert sorted(ids) == expected and manifest["rows_out"] == len(expected)
    assert rejected == rows - len(expected) == manifest.get("rows_rejected", 0)
    assert staged_leftovers(storage) == 0
    # at most the shard that was cut short is computed twice
    assert figures["rows_recomputed"] <= 100, figures
