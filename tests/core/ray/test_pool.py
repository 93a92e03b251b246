"""The replica pool on Ray: replicas started ahead by the plan step, then leased and reused by shards.

Tests end with ``shutdown(force=True)``: a plain shutdown spares replicas leased to a live
caller (this process), and a lease a test leaves behind would keep its replica, and a CPU,
from the next test for the lease timeout."""

from __future__ import annotations

import json
import os
import traceback

import pytest
import ray

from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import plan_job
from airflow_batch_provider.core.errors import PredictorFailedError, RayWorkError
from airflow_batch_provider.core.execution import allocator
from airflow_batch_provider.core.ray.pool import ReplicaPool, find_replica, pool_key
from airflow_batch_provider.core.spec import JobSpec
from tests.helpers import make_spec, slow_doubler_spec


def slow_spec(source: str, sink: str, loads_log: str, **fields) -> JobSpec:
    """A model that takes 3 s to load, and logs each load to ``loads_log``."""
    return make_spec(source, sink, predictor="tests.predictors:SlowLoad", predictor_kwargs={"load_s": 3.0, "loads_log": loads_log}, **fields)


def test_started_replica_loads_in_background_and_serves_the_shards(local_ray, jsonl_source, tmp_path):
    loads = str(tmp_path / "loads.log")
    spec = slow_spec(jsonl_source, str(tmp_path / "out"), loads, num_replicas=1)
    pending = plan_job(spec).pending
    pool = ReplicaPool(spec)
    try:
        names = pool.start(wanted=len(pending))
        assert names == [f"abp-{pool_key(spec)}-0"]  # capped by num_replicas
        handle = find_replica(names[0])
        assert handle is not None
        # start_replicas did not wait for the model: it is still loading.
        with pytest.raises(ray.exceptions.GetTimeoutError):
            ray.get(handle.info.remote(), timeout=0.5)
        assert pool.start(wanted=len(pending)) == names  # existing replica kept

        work = pool.submit(pending[:2], new_attempt())
        results = pool.result(work)
        assert work["worker"] == names[0]
        info = ray.get(handle.info.remote())
        pid = info["pid"]
        assert info["keeps_freed_memory"] is allocator.is_glibc()
        assert {r["worker_pid"] for r in results} == {pid}
        assert [r["status"] for r in results] == ["computed", "computed"]
        assert open(loads).read().split() == [str(pid)]  # loaded once, by the replica started ahead
    finally:
        pool.shutdown(force=True)


def test_start_replicas_creates_no_more_than_wanted_or_the_pool(local_ray, jsonl_source, tmp_path):
    pool = ReplicaPool(slow_spec(jsonl_source, str(tmp_path / "out"), str(tmp_path / "loads.log")))
    try:
        assert pool.size() == 2  # 2 CPUs, 1 per replica
        assert pool.start(wanted=0) == []
        assert len(pool.start(wanted=1)) == 1
        assert len(pool.start(wanted=50)) == 2
    finally:
        assert pool.shutdown() == 2


def test_replica_math_threads_follow_num_cpus(local_ray, jsonl_source, tmp_path):
    """Ray sets OMP_NUM_THREADS from the replica's num_cpus (no runtime_env of ours needed)."""
    spec = JobSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"),
                     predictor="tests.predictors:Doubler", num_cpus=2)
    if "OMP_NUM_THREADS" in os.environ:
        pytest.skip("OMP_NUM_THREADS is set in this environment; Ray passes it through instead")
    pool = ReplicaPool(spec)
    try:
        handle = pool.replica(0)[1]
        env = ray.get(handle.__ray_call__.remote(lambda self: os.environ.get("OMP_NUM_THREADS")))
        assert env == "2"
    finally:
        pool.shutdown(force=True)


def test_a_leased_call_not_yet_started_reports_running(local_ray, jsonl_source, tmp_path):
    """Between the lease and the start of ``run_shards``, ``status`` answers RUNNING (queued):
    a shard task (or its trigger) asking in that moment must not take the work for lost."""
    spec = JobSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"),
                     predictor="tests.predictors:Doubler", num_cpus=1, num_replicas=1)
    pending = plan_job(spec).pending
    attempt = new_attempt()
    pool = ReplicaPool(spec)
    try:
        name, handle = pool.lease(attempt["token"])
        assert pool.status({"worker": name, "token": attempt["token"]}) == {"state": "RUNNING", "queued": True}
        assert pool.status({"worker": name, "token": "another-token"}) == {"state": "UNKNOWN"}
        assert ray.get(handle.wait.remote("another-token", 5.0)) == {"state": "UNKNOWN"}  # no wait for work it never got

        ref = handle.run_shards.remote(spec.to_dict(), None, [s.to_dict() for s in pending[:1]], attempt)
        outcome = ray.get(handle.wait.remote(attempt["token"], 60.0))
        assert outcome["state"] == "SUCCEEDED"
        assert outcome["results"] == ray.get(ref)
        assert pool.status({"worker": name, "token": attempt["token"]})["state"] == "SUCCEEDED"
    finally:
        pool.shutdown(force=True)


def test_running_work_is_found_by_its_task_whatever_the_try(local_ray, jsonl_source, tmp_path):
    """A retry whose earlier try died before recording its Ray call can still find that call."""
    spec = slow_doubler_spec(jsonl_source, tmp_path, sleep_s=1.0, num_replicas=2)
    pending = plan_job(spec).pending
    key = "d/r/batch.shard/3"
    first_try = new_attempt(key, try_number=1)
    pool = ReplicaPool(spec)
    try:
        assert pool.find_running(key) is None  # no replica yet: nothing asked
        work = pool.submit(pending[:1], first_try)
        while pool.status(work).get("queued"):
            pass
        assert pool.find_running(key) == work == {"worker": work["worker"], "token": first_try["token"]}
        assert pool.find_running("d/r/batch.shard/4") is None  # another map index
        assert pool.find_running("d/another run/batch.shard/3") is None  # another run
        pool.result(work)
        assert pool.find_running(key) is None  # finished: a retry finds the commit instead
    finally:
        pool.shutdown(force=True)


def test_a_waiting_lease_gets_the_replica_when_its_shard_ends(local_ray, jsonl_source, tmp_path):
    """A shard task that finds the replica busy waits on it and gets it as the running shard
    ends, not at some later poll; while it waits, status calls are still answered."""
    spec = slow_doubler_spec(jsonl_source, tmp_path, sleep_s=1.0, num_replicas=1)
    pending = plan_job(spec).pending
    first = new_attempt()
    pool = ReplicaPool(spec)
    try:
        work = pool.submit(pending[:1], first)
        name, handle = work["worker"], find_replica(work["worker"])
        assert ray.get(handle.reserve.remote("other")) is False  # busy: no wait asked, none done
        assert ray.get(handle.reserve.remote("other", 0.2)) is False  # still busy when the wait ran out
        waiting = [handle.reserve.remote(f"waiting-{i}", 20.0) for i in range(12)]  # more than the control threads
        assert ray.get(handle.status.remote(first["token"]), timeout=10)["state"] == "RUNNING"
        assert [r["status"] for r in pool.result(work)] == ["computed"]
        ready, _ = ray.wait(waiting, num_returns=1, timeout=30)
        assert ready and ray.get(ready[0]) is True  # granted when the shard ended, long before its 20 s
        winner = f"waiting-{waiting.index(ready[0])}"
        assert pool.status({"worker": name, "token": winner}) == {"state": "RUNNING", "queued": True}
        ray.get(handle.release.remote(winner))
        ready, rest = ray.wait(waiting, num_returns=2, timeout=30)
        assert len(ready) == 2 and ray.get(ready) == [True, True]  # the release handed it to one more waiter...
        assert ray.wait(rest, timeout=0.5)[0] == []  # ...and the others still wait
    finally:
        pool.shutdown(force=True)


def test_lease_waits_for_a_busy_replica(local_ray, jsonl_source, tmp_path):
    """With every replica busy, ``lease`` waits (turn after turn) and gets the replica once its
    shard ends."""
    spec = slow_doubler_spec(jsonl_source, tmp_path, sleep_s=0.5, num_replicas=1)
    pending = plan_job(spec).pending
    pool = ReplicaPool(spec)
    try:
        first = pool.submit(pending[:1], new_attempt())
        attempt = new_attempt()
        second_name, handle = pool.lease(attempt["token"], wait_s=0.3)  # waits in several turns
        assert second_name == first["worker"]
        second = handle.run_shards.remote(spec.to_dict(), None, [pending[1].to_dict()], attempt)
        assert [r["status"] for r in pool.result(first) + ray.get(second)] == ["computed", "computed"]
    finally:
        pool.shutdown(force=True)


def test_lease_with_a_deadline_gives_up_on_a_busy_pool(local_ray, jsonl_source, tmp_path):
    """A lease past its deadline fails with a message instead of waiting on."""
    spec = slow_doubler_spec(jsonl_source, tmp_path, sleep_s=1.0, num_replicas=1)
    pending = plan_job(spec).pending
    pool = ReplicaPool(spec)
    try:
        work = pool.submit(pending[:1], new_attempt())
        with pytest.raises(RayWorkError, match=r"no replica of tests.predictors:SlowDoubler was free within 1 s \(1 replicas"):
            pool.lease("late", wait_s=0.2, timeout_s=1.0)
        assert [r["status"] for r in pool.result(work)] == ["computed"]
        assert pool.lease("now-free", timeout_s=5.0)[0] == work["worker"]
    finally:
        pool.shutdown(force=True)


def test_a_running_call_reports_its_progress(local_ray, jsonl_source, tmp_path):
    """While a shard computes, the caller hears rows done of rows planned, rows/s and time left."""
    spec = slow_doubler_spec(jsonl_source, tmp_path, sleep_s=0.6, num_replicas=1)
    pending = plan_job(spec).pending
    pool = ReplicaPool(spec)
    heard = []
    try:
        work = pool.submit(pending[:2], new_attempt())  # 20 rows in batches of 5, 0.6 s each
        results = pool.result(work, on_progress=heard.append, every_s=0.5)
        assert [r["status"] for r in results] == ["computed", "computed"]
    finally:
        pool.shutdown(force=True)
    assert heard, "no progress reported while the call ran"
    assert all(p.rows_total == 20 and 0 <= p.rows_done <= 20 for p in heard)
    assert [p.rows_done for p in heard] == sorted(p.rows_done for p in heard)
    assert any(p.rows_done > 0 for p in heard) and "of 20 rows" in heard[-1].describe()


def test_replicas_are_keyed_by_the_secret_values_never_named_by_them(jsonl_source, tmp_path):
    """A rotated key gets new replicas, and two deployments naming their keys alike on one
    Ray cluster do not share theirs; the value is nowhere in the name (no Ray needed)."""
    spec = JobSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"), predictor="tests.predictors:LeakyKeyed",
                     predictor_secrets={"api_key": "var:model_api_key"})
    old, new = "sk-live-old-7f3a9c0e1b2d", "sk-live-new-4e5f6a7b8c9d"
    assert pool_key(spec, {"api_key": old}) == pool_key(spec, {"api_key": old})  # every task of a deployment finds them
    assert pool_key(spec, {"api_key": old}) != pool_key(spec, {"api_key": new})
    names = [ReplicaPool(spec, secrets={"api_key": value}).name(0) for value in (old, new)]
    assert names[0] != names[1] and not any(part in name for name in names for part in ("sk-live", "old", "new"))
    with pytest.raises(RayWorkError, match="were not resolved"):
        ReplicaPool(spec).name(0)


def test_a_replicas_error_naming_its_secret_reaches_the_caller_without_it(local_ray, jsonl_source, tmp_path):
    """The replica gets the secret values with the call and redacts with them: neither the
    error the caller raises nor the status a trigger reads holds the value."""
    secret = "sk-live-5a6b7c8d9e0f1a2b"
    spec = JobSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"), predictor="tests.predictors:LeakyKeyed",
                     predictor_secrets={"api_key": "var:model_api_key"}, num_cpus=1, num_replicas=1, rows_per_shard=100)
    pool = ReplicaPool(spec, secrets={"api_key": secret})
    try:
        work = pool.submit(plan_job(spec).pending[:1], new_attempt())
        with pytest.raises(PredictorFailedError, match=r"key=\*\*\*") as caught:  # the core's error, its type kept across Ray
            pool.result(work)
        assert secret not in "".join(traceback.format_exception(caught.value))
        status = pool.status(work)
        assert status["state"] == "FAILED" and "key=***" in status["error"] and secret not in json.dumps(status)
    finally:
        pool.shutdown(force=True)
