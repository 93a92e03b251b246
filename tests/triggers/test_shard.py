"""RayShardTrigger: serialisation (no secrets) and the events its run() yields."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from airflow_batch_provider.core import api
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


class FakeDriver:
    """Stands in for the Ray client child process (``api.RayDriver``): answers ``status`` with
    the next outcome (the last one repeats) and records every call, its target and thread."""

    def __init__(self, outcomes, state):
        self.outcomes = list(outcomes)
        self.state = state

    def call(self, method, spec, timeout=None, **args):
        import threading

        self.state["threads"].add(threading.get_ident())
        self.state["calls"].append((method, args))
        time.sleep(0.01)  # a blocking call: must run off the event loop
        if method == "cancel":
            return "RUNNING"
        return self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]


@pytest.fixture
def fake_ray(monkeypatch):
    state: dict[str, Any] = {"outcomes": [{"state": "LOST"}], "targets": [], "threads": set(), "calls": []}

    async def aget_target(self):
        return api.RayTarget(address="1.2.3.4:6379", token="secret")

    def for_target(target):
        state["targets"].append(target)
        return FakeDriver(state["outcomes"], state)

    monkeypatch.setattr(RayHook, "aget_target", aget_target)
    monkeypatch.setattr(api.RayDriver, "for_target", staticmethod(for_target))
    return state


def run_trigger(trigger: RayShardTrigger) -> dict[str, Any]:
    async def first():
        import threading

        loop_thread = threading.get_ident()
        async for event in trigger.run():
            return event.payload, loop_thread

    return asyncio.run(first())


def test_run_polls_until_success_off_the_event_loop(fake_ray):
    results = [api.ShardResult("s0", "computed", rows_in=3, rows_out=3).to_dict()]
    fake_ray["outcomes"] = [{"state": "RUNNING"}, {"state": "RUNNING"}, {"state": "SUCCEEDED", "results": results}]
    payload, loop_thread = run_trigger(make())
    assert payload == {"status": "success", "worker": "abp-x-0", "token": "tok", "results": results}
    assert fake_ray["targets"] == [api.RayTarget(address="1.2.3.4:6379", token="secret")]
    assert [c[0] for c in fake_ray["calls"]] == ["status"] * 3
    assert loop_thread not in fake_ray["threads"]  # the driver was called from worker threads only


def test_run_reports_ray_failure(fake_ray):
    fake_ray["outcomes"] = [{"state": "FAILED", "error": "RuntimeError: boom"}]
    payload, _ = run_trigger(make())
    assert payload["status"] == "error" and "RuntimeError: boom" in payload["message"]


@pytest.mark.parametrize("state", ["LOST", "UNKNOWN"])
def test_worker_gone_and_shards_committed_is_success(fake_ray, monkeypatch, state):
    fake_ray["outcomes"] = [{"state": state}]
    committed = [api.ShardResult("s0", "skipped", rows_in=5, rows_out=5, bytes=9).to_dict()]
    monkeypatch.setattr(RayShardTrigger, "_committed_results", lambda self: committed)
    payload, _ = run_trigger(make())
    assert payload["status"] == "success" and payload["results"] == committed


def test_worker_gone_and_shard_missing_is_lost(fake_ray, monkeypatch):
    """The task resumes on a ``lost`` event and submits again; the count of earlier
    resubmissions travels through the trigger so max_retries holds across deferrals."""
    monkeypatch.setattr(RayShardTrigger, "_committed_results", lambda self: None)
    payload, _ = run_trigger(make(resubmits=1))
    assert payload["status"] == "lost" and "LOST" in payload["message"] and payload["resubmits"] == 1
    assert (payload["worker"], payload["token"]) == ("abp-x-0", "tok")


def test_on_kill_cancels_the_ray_call(fake_ray):
    """Airflow calls on_kill when a user marks the deferred task failed or success, or clears it."""
    trigger = make()
    asyncio.run(trigger.on_kill())
    assert fake_ray["calls"] == [("cancel", {"work": {"worker": "abp-x-0", "token": "tok"}})]


def test_committed_results_reads_real_sentinels(tmp_path):
    """The sink check on real files: plan + run one shard, then ask the trigger."""
    from airflow_batch_provider.core.domain.commit import new_attempt
    from airflow_batch_provider.core.domain.jobs import plan_job
    from airflow_batch_provider.core.domain.layout import JobStorage
    from airflow_batch_provider.core.execution.runner import ShardRunner
    from airflow_batch_provider.core.spec import JobSpec

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"id": i, "value": i}) + "\n" for i in range(6)))
    spec = JobSpec(source=str(src / "*.jsonl"), sink=str(tmp_path / "out"), predictor="tests.predictors:Doubler", rows_per_shard=3)
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


def test_committed_results_only_reads_the_sink(tmp_path):
    """A commit whose part is not yet published is not rolled forward by the triggerer: it
    counts as not committed, and the sink is left exactly as it was (the shard task heals it)."""
    import os

    from airflow_batch_provider.core.domain.commit import check_shard, commit_shard, new_attempt
    from airflow_batch_provider.core.domain.jobs import plan_job
    from airflow_batch_provider.core.domain.layout import JobStorage
    from airflow_batch_provider.core.spec import JobSpec

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(3)))
    spec = JobSpec(source=str(src / "*.jsonl"), sink=str(tmp_path / "out"), predictor="tests.predictors:Doubler")
    storage = JobStorage.for_spec(spec)
    shard = plan_job(spec, storage).pending[0]
    staged = storage.sink.open_staged(storage.part_path(shard.shard_id))
    staged.stream.write(b"{}\n")
    staged.finish()
    staged.publish = lambda: True  # the process "dies" between its commit and its publish
    commit_shard(storage, shard, staged, rows_in=3, rows_out=3, lines=3, attempt=new_attempt())

    def snapshot():
        return sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, files in os.walk(tmp_path) for f in files)

    before = snapshot()
    trigger = make(spec=spec.to_dict(), shards=[shard.to_dict()])
    assert trigger._committed_results() is None
    assert snapshot() == before  # nothing published, quarantined or deleted
    assert check_shard(storage, shard).committed  # a task process rolls it forward
    assert trigger._committed_results()[0]["rows_in"] == 3


def test_run_logs_progress_lines_while_ray_computes(fake_ray, capsys):
    running = {"state": "RUNNING", "progress": {"rows_done": 250, "rows_total": 1000, "seconds": 5.0}}
    fake_ray["outcomes"] = [running, running, {"state": "SUCCEEDED", "results": []}]
    payload, _ = run_trigger(make(progress_interval=0))
    assert payload["status"] == "success"
    logged = capsys.readouterr().out  # the trigger's logger (structlog) writes to stdout here
    assert logged.count("Shard(s) s0: 250 of 1,000 rows (25%), 50 rows/s, about 15 s left") == 2


def test_past_execution_timeout_the_trigger_cancels_the_ray_call(fake_ray):
    """A deferred task's execution_timeout reaches Ray: the trigger cancels the call (freeing
    the replica) and reports the timeout, instead of Airflow only failing the task."""
    fake_ray["outcomes"] = [{"state": "RUNNING"}]
    payload, _ = run_trigger(make(cancel_at=time.time() + 0.2))
    assert payload["status"] == "error" and "execution_timeout reached" in payload["message"]
    assert fake_ray["calls"][-1] == ("cancel", {"work": {"worker": "abp-x-0", "token": "tok"}})
    assert make(cancel_at=5.0).serialize()[1]["cancel_at"] == 5.0
