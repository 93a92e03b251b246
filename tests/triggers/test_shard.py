"""RayShardTrigger: serialisation (no secrets) and the events its run() yields."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from airflow_batch_provider.core import ray_exec
from airflow_batch_provider.hooks.ray import RayHook
from airflow_batch_provider.triggers import shard as shard_mod
from airflow_batch_provider.triggers.shard import RayShardTrigger

SPEC = {"source": "/in/*.jsonl", "sink": "/out", "predictor": "tests.predictors:Doubler"}
SHARDS = [{"shard_id": "s0"}]


def make(**kwargs: Any) -> RayShardTrigger:
    args = dict(worker="abp-x-0", token="tok", spec=SPEC, shards=SHARDS, ray_conn_id="ray_x", label="s0", poll_interval=0.01)
    args.update(kwargs)
    return RayShardTrigger(**args)


def test_serialize_round_trip_has_no_secret():
    path, kwargs = make().serialize()
    assert path == "airflow_batch_provider.triggers.shard.RayShardTrigger"
    assert kwargs["ray_conn_id"] == "ray_x"
    assert "password" not in json.dumps(kwargs) and "auth_token" not in json.dumps(kwargs)
    clone = RayShardTrigger(**kwargs)
    assert clone.serialize() == (path, kwargs)
    json.dumps(kwargs)  # stored in the DB as JSON


class FakeRemote:
    def __init__(self, outcomes):
        self.outcomes = list(outcomes)

    def remote(self, token):
        return self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]


class FakeHandle:
    def __init__(self, outcomes):
        self.status = FakeRemote(outcomes)


@pytest.fixture
def fake_ray(monkeypatch):
    state: dict[str, Any] = {"handle": None, "connected": 0, "threads": set()}

    async def aget_target(self):
        return ray_exec.RayTarget(address="1.2.3.4:6379", token="secret")

    def connect(target):
        state["connected"] += 1

    def get(ref, timeout=None):
        import threading

        state["threads"].add(threading.get_ident())
        time.sleep(0.01)  # a blocking call: must run off the event loop
        return ref

    monkeypatch.setattr(RayHook, "aget_target", aget_target)
    monkeypatch.setattr(ray_exec, "connect", connect)
    monkeypatch.setattr(ray_exec, "find_worker", lambda name: state["handle"])
    monkeypatch.setattr(ray_exec.ray, "get", get)
    return state


def run_trigger(trigger: RayShardTrigger) -> dict[str, Any]:
    async def first():
        import threading

        loop_thread = threading.get_ident()
        async for event in trigger.run():
            return event.payload, loop_thread

    return asyncio.run(first())


def test_run_polls_until_success_off_the_event_loop(fake_ray):
    results = [{"shard_id": "s0", "status": "computed", "rows_in": 3, "rows_out": 3}]
    fake_ray["handle"] = FakeHandle([{"state": "RUNNING"}, {"state": "RUNNING"}, {"state": "SUCCEEDED", "results": results}])
    payload, loop_thread = run_trigger(make())
    assert payload == {"status": "success", "worker": "abp-x-0", "token": "tok", "results": results}
    assert fake_ray["connected"] == 1
    assert loop_thread not in fake_ray["threads"]  # ray.get ran in worker threads only


def test_run_reports_ray_failure(fake_ray):
    fake_ray["handle"] = FakeHandle([{"state": "FAILED", "error": "RuntimeError: boom"}])
    payload, _ = run_trigger(make())
    assert payload["status"] == "error" and "RuntimeError: boom" in payload["message"]


@pytest.mark.parametrize("handle", [None, FakeHandle([{"state": "UNKNOWN"}])])
def test_worker_gone_and_shards_committed_is_success(fake_ray, monkeypatch, handle):
    fake_ray["handle"] = handle
    committed = [{"shard_id": "s0", "status": "skipped", "rows_in": 5, "rows_out": 5, "bytes": 9, "seconds": 0.0, "model_seconds": 0.0}]
    monkeypatch.setattr(RayShardTrigger, "_committed_results", lambda self: committed)
    payload, _ = run_trigger(make())
    assert payload["status"] == "success" and payload["results"] == committed


def test_worker_gone_and_shard_missing_is_error(fake_ray, monkeypatch):
    fake_ray["handle"] = None
    monkeypatch.setattr(RayShardTrigger, "_committed_results", lambda self: None)
    payload, _ = run_trigger(make())
    assert payload["status"] == "error" and "LOST" in payload["message"] and "retry" in payload["message"]


def test_committed_results_reads_real_sentinels(tmp_path):
    """The sink check on real files: plan + run one shard, then ask the trigger."""
    from airflow_batch_provider.core.commit import JobStorage, new_attempt
    from airflow_batch_provider.core.jobs import plan_job
    from airflow_batch_provider.core.runner import ShardRunner
    from airflow_batch_provider.core.spec import BatchSpec

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"id": i, "value": i}) + "\n" for i in range(6)))
    spec = BatchSpec(source=str(src / "*.jsonl"), sink=str(tmp_path / "out"), predictor="tests.predictors:Doubler", rows_per_shard=3)
    job = plan_job(spec, JobStorage.for_spec(spec))
    shards = [s.to_dict() for s in job.plan.shards]
    trigger = make(spec=spec.to_dict(), shards=shards)
    assert trigger._committed_results() is None
    runner = ShardRunner(spec)
    for s in job.plan.shards:
        runner.run(s, new_attempt())
    results = trigger._committed_results()
    assert [r["shard_id"] for r in results] == [s["shard_id"] for s in shards]
    assert sum(r["rows_in"] for r in results) == 6


def test_module_is_listed_in_provider_info():
    from airflow_batch_provider.get_provider_info import get_provider_info

    modules = [m for t in get_provider_info()["triggers"] for m in t["python-modules"]]
    assert shard_mod.__name__ in modules
