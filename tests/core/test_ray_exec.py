"""Model replicas on Ray: started ahead by the plan step, then leased and reused by shards."""

from __future__ import annotations

import os

import pytest
import ray

from airflow_batch_provider import BatchSpec
from airflow_batch_provider.core import allocator, ray_exec
from airflow_batch_provider.core.commit import new_attempt
from airflow_batch_provider.core.jobs import plan_job


def slow_spec(source: str, sink: str, loads_log: str, **kwargs) -> BatchSpec:
    return BatchSpec(
        source=source, source_format="jsonl", sink=sink, predictor="tests.predictors:SlowLoad",
        predictor_kwargs={"load_s": 3.0, "loads_log": loads_log}, num_cpus=1, rows_per_shard=100, **kwargs,
    )


def test_started_replica_loads_in_background_and_serves_the_shards(local_ray, jsonl_source, tmp_path):
    loads = str(tmp_path / "loads.log")
    spec = slow_spec(jsonl_source, str(tmp_path / "out"), loads, num_workers=1)
    pending = plan_job(spec).pending
    try:
        names = ray_exec.start_workers(spec, wanted=len(pending))
        assert names == [f"abp-{ray_exec.worker_key(spec)}-0"]  # capped by num_workers
        handle = ray_exec.find_worker(names[0])
        assert handle is not None
        # start_workers did not wait for the model: it is still loading.
        with pytest.raises(ray.exceptions.GetTimeoutError):
            ray.get(handle.info.remote(), timeout=0.5)
        assert ray_exec.start_workers(spec, wanted=len(pending)) == names  # existing replica kept

        name, ref = ray_exec.submit(spec, pending[:2], new_attempt())
        results = ray.get(ref)
        assert name == names[0]
        info = ray.get(handle.info.remote())
        pid = info["pid"]
        assert info["keeps_freed_memory"] is allocator.is_glibc()
        assert {r["worker_pid"] for r in results} == {pid}
        assert [r["status"] for r in results] == ["computed", "computed"]
        assert open(loads).read().split() == [str(pid)]  # loaded once, by the replica started ahead
    finally:
        ray_exec.kill_workers(spec)


def test_start_workers_creates_no_more_than_wanted_or_the_pool(local_ray, jsonl_source, tmp_path):
    spec = slow_spec(jsonl_source, str(tmp_path / "out"), str(tmp_path / "loads.log"))
    try:
        assert ray_exec.pool_size(spec) == 2  # 2 CPUs, 1 per replica
        assert ray_exec.start_workers(spec, wanted=0) == []
        assert len(ray_exec.start_workers(spec, wanted=1)) == 1
        assert len(ray_exec.start_workers(spec, wanted=50)) == 2
    finally:
        assert ray_exec.kill_workers(spec) == 2


def test_replica_math_threads_follow_num_cpus(local_ray, jsonl_source, tmp_path):
    """Ray sets OMP_NUM_THREADS from the replica's num_cpus (no runtime_env of ours needed)."""
    spec = BatchSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"),
                     predictor="tests.predictors:Doubler", num_cpus=2)
    if "OMP_NUM_THREADS" in os.environ:
        pytest.skip("OMP_NUM_THREADS is set in this environment; Ray passes it through instead")
    try:
        handle = ray_exec.get_worker(spec, 0)[1]
        env = ray.get(handle.__ray_call__.remote(lambda self: os.environ.get("OMP_NUM_THREADS")))
        assert env == "2"
    finally:
        ray_exec.kill_workers(spec)


def test_a_leased_call_not_yet_started_reports_running(local_ray, jsonl_source, tmp_path):
    """Between the lease and the start of ``run_shards``, ``status`` answers RUNNING (queued):
    a shard task (or its trigger) asking in that moment must not take the work for lost."""
    spec = BatchSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"),
                     predictor="tests.predictors:Doubler", num_cpus=1, num_workers=1)
    pending = plan_job(spec).pending
    attempt = new_attempt()
    try:
        name, handle = ray_exec.lease_worker(spec, attempt["token"])
        assert ray_exec.work_status(name, attempt["token"]) == {"state": "RUNNING", "queued": True}
        assert ray_exec.work_status(name, "another-token") == {"state": "UNKNOWN"}
        assert ray.get(handle.wait.remote("another-token", 5.0)) == {"state": "UNKNOWN"}  # no wait for work it never got

        ref = handle.run_shards.remote(spec.to_dict(), None, [s.to_dict() for s in pending[:1]], attempt)
        outcome = ray.get(handle.wait.remote(attempt["token"], 60.0))
        assert outcome["state"] == "SUCCEEDED"
        assert outcome["results"] == ray.get(ref)
        assert ray_exec.work_status(name, attempt["token"])["state"] == "SUCCEEDED"
    finally:
        ray_exec.kill_workers(spec)


def test_running_work_is_found_by_its_task_whatever_the_try(local_ray, jsonl_source, tmp_path):
    """A retry whose earlier try died before recording its Ray call can still find that call."""
    spec = BatchSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"), predictor="tests.predictors:SlowDoubler",
                     predictor_kwargs={"sleep_s": 1.0}, batch_size=5, rows_per_shard=10, num_cpus=1, num_workers=2)
    pending = plan_job(spec).pending
    task_key = {"dag_id": "d", "run_id": "r", "task_id": "batch.shard", "map_index": 3}
    first_try = new_attempt(**task_key, try_number=1)
    try:
        assert ray_exec.find_running_work(spec, task_key) is None  # no replica yet: nothing asked
        name, ref = ray_exec.submit(spec, pending[:1], first_try)
        while ray_exec.work_status(name, first_try["token"]).get("queued"):
            pass
        assert ray_exec.find_running_work(spec, task_key) == {"worker": name, "token": first_try["token"]}
        assert ray_exec.find_running_work(spec, {**task_key, "map_index": 4}) is None
        assert ray_exec.find_running_work(spec, {**task_key, "run_id": "another run"}) is None
        ray.get(ref)
        assert ray_exec.find_running_work(spec, task_key) is None  # finished: a retry finds the commit instead
    finally:
        ray_exec.kill_workers(spec)


def test_a_waiting_lease_gets_the_replica_when_its_shard_ends(local_ray, jsonl_source, tmp_path):
    """A shard task that finds the replica busy waits on it and gets it as the running shard
    ends, not at some later poll; while it waits, status calls are still answered."""
    spec = BatchSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"), predictor="tests.predictors:SlowDoubler",
                     predictor_kwargs={"sleep_s": 1.0}, batch_size=5, rows_per_shard=10, num_cpus=1, num_workers=1)
    pending = plan_job(spec).pending
    first = new_attempt()
    try:
        name, ref = ray_exec.submit(spec, pending[:1], first)
        handle = ray_exec.find_worker(name)
        assert ray.get(handle.reserve.remote("other")) is False  # busy: no wait asked, none done
        assert ray.get(handle.reserve.remote("other", 0.2)) is False  # still busy when the wait ran out
        waiting = [handle.reserve.remote(f"waiting-{i}", 20.0) for i in range(12)]  # more than the control threads
        assert ray.get(handle.status.remote(first["token"]), timeout=10)["state"] == "RUNNING"
        assert [r["status"] for r in ray.get(ref)] == ["computed"]
        ready, _ = ray.wait(waiting, num_returns=1, timeout=30)
        assert ready and ray.get(ready[0]) is True  # granted when the shard ended, long before its 20 s
        winner = f"waiting-{waiting.index(ready[0])}"
        assert ray_exec.work_status(name, winner) == {"state": "RUNNING", "queued": True}
        ray.get(handle.release.remote(winner))
        ready, rest = ray.wait(waiting, num_returns=2, timeout=30)
        assert len(ready) == 2 and ray.get(ready) == [True, True]  # the release handed it to one more waiter...
        assert ray.wait(rest, timeout=0.5)[0] == []  # ...and the others still wait
    finally:
        ray_exec.kill_workers(spec)


def test_lease_worker_waits_for_a_busy_replica(local_ray, jsonl_source, tmp_path):
    """With every replica busy, ``lease_worker`` waits (turn after turn) and gets the replica
    once its shard ends."""
    spec = BatchSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"), predictor="tests.predictors:SlowDoubler",
                     predictor_kwargs={"sleep_s": 0.5}, batch_size=5, rows_per_shard=10, num_cpus=1, num_workers=1)
    pending = plan_job(spec).pending
    try:
        name, first = ray_exec.submit(spec, pending[:1], new_attempt())
        attempt = new_attempt()
        second_name, handle = ray_exec.lease_worker(spec, attempt["token"], wait_s=0.3)  # waits in several turns
        assert second_name == name
        second = handle.run_shards.remote(spec.to_dict(), None, [pending[1].to_dict()], attempt)
        assert [r["status"] for r in ray.get(first) + ray.get(second)] == ["computed", "computed"]
    finally:
        ray_exec.kill_workers(spec)
