"""Every wait on the Ray side ends: infeasible resources, cancelled calls, hung predictors,
leases of dead shard tasks, and a cleanup that must not stop a replica serving a shard."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest
import ray

from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import plan_job
from airflow_batch_provider.core.errors import ResourcesUnavailableError
from airflow_batch_provider.core.ray.pool import ReplicaPool, find_replica
from airflow_batch_provider.core.spec import JobSpec
from tests.helpers import ROOT, slow_doubler_spec


def running(pool: ReplicaPool, work: dict[str, str], timeout: float = 60) -> None:
    """Wait until the call has started on its replica (not only leased)."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = pool.status(work)
        if outcome.get("state") == "RUNNING" and not outcome.get("queued"):
            return
        assert time.monotonic() < deadline, outcome
        time.sleep(0.1)


def parts(tmp_path) -> list[str]:
    """Committed output: published parts and sentinels (a killed call may leave hidden staged data)."""
    out = tmp_path / "out"
    if not out.exists():
        return []
    return sorted(p.name for p in out.rglob("part-*.parquet")) + sorted(p.name for p in (out / "_checkpoint" / "shards").glob("*.json"))


def test_gpus_on_a_cpu_only_cluster_fail_at_once_naming_the_resources(local_ray, jsonl_source, tmp_path):
    spec = JobSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"),
                     predictor="tests.predictors:Doubler", num_gpus=1, num_cpus=1)
    pool = ReplicaPool(spec)
    started = time.monotonic()
    with pytest.raises(ResourcesUnavailableError) as err:
        pool.submit(plan_job(spec).pending[:1], new_attempt())
    assert time.monotonic() - started < 10
    message = str(err.value)
    assert "num_gpus=1" in message and "num_cpus=1" in message and "2 CPU, 0 GPU" in message
    with pytest.raises(ResourcesUnavailableError):
        pool.start(wanted=1)  # the plan step's start_replicas too
    assert find_replica(pool.name(0)) is None  # no replica left pending forever


def test_cancel_stops_a_running_call_between_batches_and_frees_the_replica(local_ray, jsonl_source, tmp_path):
    spec = slow_doubler_spec(jsonl_source, tmp_path, sleep_s=1.0)
    pending = plan_job(spec).pending
    pool = ReplicaPool(spec)
    try:
        work = pool.submit(pending[:3], new_attempt())  # 6 batches, 6 s
        running(pool, work)
        started = time.monotonic()
        assert pool.cancel(work) == "FAILED"
        assert time.monotonic() - started < 5
        outcome = pool.status(work)
        assert outcome["state"] == "FAILED" and "ShardCancelledError" in outcome["error"]
        assert pool.lease("next", timeout_s=5.0)[0] == work["worker"]  # free at once
        assert parts(tmp_path) == []  # nothing of the cancelled call was committed
    finally:
        pool.shutdown(force=True)


def test_cancel_kills_a_replica_whose_predictor_hangs(local_ray, jsonl_source, tmp_path):
    entered = tmp_path / "entered.log"
    spec = slow_doubler_spec(jsonl_source, tmp_path, sleep_s=1000.0, max_retries=1)
    spec = dataclasses.replace(spec, predictor_kwargs={**spec.predictor_kwargs, "entered_log": str(entered)})
    pending = plan_job(spec).pending
    pool = ReplicaPool(spec)
    try:
        work = pool.submit(pending[:1], new_attempt())
        running(pool, work)
        # Inside its first batch, not only started: a cancel that came earlier stops the call
        # at its first check between batches (FAILED), and the hang would not be tested.
        deadline = time.monotonic() + 60
        while not entered.exists():
            assert time.monotonic() < deadline, "the predictor never started a batch"
            time.sleep(0.1)
        pid = ray.get(find_replica(work["worker"]).info.remote())["pid"]
        assert pool.cancel(work, grace_s=1.0) == "KILLED"
        name, handle = pool.lease("after-the-hang", timeout_s=60.0)  # Ray restarted the replica
        assert name == work["worker"] and ray.get(handle.info.remote())["pid"] != pid
        assert parts(tmp_path) == []
    finally:
        pool.shutdown(force=True)


def test_a_cancelled_call_that_has_not_started_never_starts(local_ray, jsonl_source, tmp_path):
    spec = slow_doubler_spec(jsonl_source, tmp_path, sleep_s=0.1)
    pending = plan_job(spec).pending
    pool = ReplicaPool(spec)
    try:
        attempt = new_attempt()
        name, handle = pool.lease(attempt["token"])
        work = {"worker": name, "token": attempt["token"]}
        assert pool.cancel(work) == "UNKNOWN"  # it was leased, not started: nothing runs for it any more
        ref = handle.run_shards.remote(spec.to_dict(), None, [pending[0].to_dict()], attempt)
        with pytest.raises(ray.exceptions.RayTaskError, match="ShardCancelledError"):
            ray.get(ref, timeout=30)
        assert parts(tmp_path) == []
    finally:
        pool.shutdown(force=True)


def test_the_lease_of_a_dead_shard_task_is_freed_promptly(local_ray, jsonl_source, tmp_path):
    """A shard task (a Ray driver of its own) that dies between leasing a replica and starting
    its call: the replica is free again within seconds, not after the 120 s lease timeout."""
    spec = slow_doubler_spec(jsonl_source, tmp_path, sleep_s=0.1)
    pool = ReplicaPool(spec)
    pool.replica(0)
    address = ray.get_runtime_context().gcs_address
    script = (
        "import os, ray\n"
        "from airflow_batch_provider.core.ray.connection import NAMESPACE\n"
        "from airflow_batch_provider.core.ray.pool import ReplicaPool\n"
        "from airflow_batch_provider.core.spec import JobSpec\n"
        f"ray.init(address={address!r}, namespace=NAMESPACE, logging_level='ERROR')\n"
        f"spec = JobSpec.from_dict({spec.to_dict()!r})\n"
        "print(ReplicaPool(spec).lease('dead-task', timeout_s=60)[0], flush=True)\n"
        "os._exit(0)\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    try:
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == pool.name(0), out.stderr[-3000:]
        assert pool.status({"worker": pool.name(0), "token": "dead-task"}).get("queued") in (True, None)
        started = time.monotonic()
        assert pool.lease("alive-task", timeout_s=60.0)[0] == pool.name(0)
        freed_after = time.monotonic() - started
        assert freed_after < 30, freed_after
    finally:
        pool.shutdown(force=True)


def test_cleanup_spares_a_replica_serving_a_shard(local_ray, jsonl_source, tmp_path):
    """Replicas are shared by every run of a model: one run's finalize stops only idle ones."""
    spec = slow_doubler_spec(jsonl_source, tmp_path, sleep_s=0.5, num_replicas=2)
    pending = plan_job(spec).pending
    pool = ReplicaPool(spec)
    try:
        work = pool.submit(pending[:2], new_attempt())  # another run's shard, 2 s
        other = pool.lease("idle-check")  # the second replica, leased then given back
        pool.release({"worker": other[0], "token": "idle-check"})
        running(pool, work)
        assert pool.shutdown() == 1  # the idle one only
        assert find_replica(work["worker"]) is not None
        assert [r["status"] for r in pool.result(work)] == ["computed", "computed"]
        assert pool.shutdown() == 1  # idle now
    finally:
        pool.shutdown(force=True)
