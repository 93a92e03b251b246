"""Model replicas on Ray: started ahead by the plan step, then leased and reused by shards."""

from __future__ import annotations

import os

import pytest
import ray

from airflow_batch_provider import BatchSpec
from airflow_batch_provider.core import ray_exec
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
        pid = ray.get(handle.info.remote())["pid"]
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
