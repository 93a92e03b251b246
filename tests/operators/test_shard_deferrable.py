"""BatchShardOperator's deferrable path: defer after submit, execute_complete validates events."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_batch_provider.core import api
from airflow_batch_provider.operators import batch as batch_mod
from airflow_batch_provider.operators.batch import BatchInferenceException, BatchShardOperator
from airflow_batch_provider.triggers.shard import RayShardTrigger
from tests.helpers import StateStore, task_context

SPEC = {"source": "/in/*.jsonl", "sink": "/out", "predictor": "tests.predictors:Doubler"}
UNIT = {"label": "s0", "shards": [{"shard_id": "s0"}]}
RESULT = {"shard_id": "s0", "status": "computed", "rows_in": 4, "rows_out": 4, "bytes": 10, "seconds": 1.0, "model_seconds": 0.5}


def op(**kwargs: Any) -> BatchShardOperator:
    return BatchShardOperator(task_id="shard", spec=SPEC, work_unit=UNIT, ray_conn_id="ray_x", **kwargs)


class Pool:
    """The model's replicas as the task sees them: ``status`` answers the next state (the last repeats)."""

    def __init__(self, *states: str, results: list | None = None):
        self.states = list(states)
        self.results = results or []

    def status(self, work):
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"state": state, "results": self.results} if state == "SUCCEEDED" else {"state": state}


#: this module's task (``shard``, not started yet), around a ``task_state_store``
context = functools.partial(task_context, task_id="shard", start_date=None)


def with_pool(task: BatchShardOperator, *states: str, results: list | None = None) -> BatchShardOperator:
    task.__dict__["replicas"] = Pool(*states, results=results)
    return task


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.setattr(batch_mod.RayHook, "get_conn", lambda self: None)


def test_deferrable_defaults_to_config(monkeypatch):
    assert op().deferrable is False
    assert op(deferrable=True).deferrable is True


def test_execute_complete_success_returns_summary():
    summary = op(deferrable=True).execute_complete({}, {"status": "success", "token": "t", "results": [RESULT]})
    assert summary["shards"] == ["s0"] and summary["computed"] == 1 and summary["rows_in"] == 4


@pytest.mark.parametrize(
    "event, needle",
    [
        (None, "no valid event"),
        ({"no": "status"}, "no valid event"),
        ({"status": "error", "message": "shard(s) s0 failed on Ray: boom"}, "boom"),
        ({"status": "success"}, "without results"),
    ],
)
def test_execute_complete_raises_on_bad_or_failed_event(event, needle):
    with pytest.raises(BatchInferenceException, match=needle):
        op(deferrable=True).execute_complete({}, event)


def test_execute_submits_then_defers_with_conn_id_not_token(monkeypatch):
    task = with_pool(op(deferrable=True, poll_interval=2), "RUNNING")
    store = StateStore()
    monkeypatch.setattr(BatchShardOperator, "submit_job", lambda self, ctx: {"worker": "w", "token": "t1"})
    with pytest.raises(TaskDeferred) as deferred:
        task.execute(context(store))
    trigger = deferred.value.trigger
    assert isinstance(trigger, RayShardTrigger)
    assert deferred.value.method_name == "execute_complete"
    path, kwargs = trigger.serialize()
    assert kwargs["ray_conn_id"] == "ray_x" and kwargs["token"] == "t1" and kwargs["poll_interval"] == 2
    assert store[BatchShardOperator.external_id_key] == {"worker": "w", "token": "t1"}


def test_execute_reconnects_to_running_work_without_submitting(monkeypatch):
    task = with_pool(op(deferrable=True), "RUNNING")
    store = StateStore({BatchShardOperator.external_id_key: {"worker": "w", "token": "old"}})
    monkeypatch.setattr(BatchShardOperator, "submit_job", lambda self, ctx: pytest.fail("submitted again"))
    with pytest.raises(TaskDeferred) as deferred:
        task.execute(context(store))
    assert deferred.value.trigger.token == "old"


def test_execute_returns_early_when_already_finished(monkeypatch):
    task = with_pool(op(deferrable=True), "SUCCEEDED", results=[RESULT])
    monkeypatch.setattr(BatchShardOperator, "submit_job", lambda self, ctx: {"worker": "w", "token": "t"})
    assert task.execute(context(StateStore()))["computed"] == 1


def test_execute_resubmits_when_earlier_work_is_lost(monkeypatch):
    task = with_pool(op(deferrable=True), "LOST", "RUNNING")
    store = StateStore({BatchShardOperator.external_id_key: {"worker": "w", "token": "old"}})
    monkeypatch.setattr(BatchShardOperator, "submit_job", lambda self, ctx: {"worker": "w", "token": "new"})
    with pytest.raises(TaskDeferred) as deferred:
        task.execute(context(store))
    assert deferred.value.trigger.token == "new"
    assert store[BatchShardOperator.external_id_key]["token"] == "new"


LOST = {"status": "lost", "worker": "w", "token": "old", "resubmits": 0, "message": "shard(s) s0: the Ray work old is LOST"}


def test_execute_complete_resubmits_a_lost_call_and_defers_again(monkeypatch):
    task = with_pool(op(deferrable=True), "RUNNING")
    store = StateStore({BatchShardOperator.external_id_key: {"worker": "w", "token": "old"}})
    monkeypatch.setattr(api.ShardCall, "submit", lambda self: api.WorkId("w2", "new", self.unit))
    with pytest.raises(TaskDeferred) as deferred:
        task.execute_complete(context(store), LOST)
    trigger = deferred.value.trigger
    assert (trigger.worker, trigger.token, trigger.resubmits) == ("w2", "new", 1)
    assert store[BatchShardOperator.external_id_key]["token"] == "new"


def test_execute_complete_returns_when_the_resubmitted_call_already_finished(monkeypatch):
    task = with_pool(op(deferrable=True), "SUCCEEDED", results=[RESULT])
    monkeypatch.setattr(api.ShardCall, "submit", lambda self: api.WorkId("w2", "new", self.unit))
    assert task.execute_complete(context(StateStore()), LOST)["computed"] == 1


def test_execute_complete_stops_resubmitting_past_max_retries(monkeypatch):
    task = op(deferrable=True)  # the spec's max_retries (default) bounds resubmissions across deferrals
    monkeypatch.setattr(api.ShardCall, "submit", lambda self: pytest.fail("submitted past max_retries"))
    event = {**LOST, "resubmits": task.core_spec.max_retries}
    with pytest.raises(BatchInferenceException, match="lost .* times"):
        task.execute_complete(context(StateStore()), event)


def test_batch_inference_plumbs_deferrable():
    import pendulum
    from airflow.sdk import DAG

    from airflow_batch_provider import BatchSpec, batch_inference

    spec = BatchSpec(**SPEC)
    with DAG("d", schedule=None, start_date=pendulum.datetime(2026, 1, 1)) as dag:
        batch_inference(spec, deferrable=True, max_active_shards=2)
    shard = dag.get_task("batch_inference.shard")
    assert shard.partial_kwargs["deferrable"] is True
    assert shard.max_active_tis_per_dagrun == 2


def test_a_deferrable_task_defers_only_once_the_replica_runs_its_call(local_ray, jsonl_source, tmp_path):
    """Deferring ends the task's process, and with it the Ray job that holds the replica's
    lease. A call still queued behind that lease would lose the replica to another shard task
    (seen in a deployment run: that task's call then waited unseen, was taken for lost, and
    its shard computed twice). The task waits until the replica runs its call."""
    import threading
    import time

    import ray

    from airflow_batch_provider.core.domain.commit import new_attempt
    from airflow_batch_provider.core.domain.jobs import plan_job

    spec = {"source": jsonl_source, "source_format": "jsonl", "sink": str(tmp_path / "out"),
            "predictor": "tests.predictors:Doubler", "num_cpus": 1, "num_replicas": 1}
    task = op(deferrable=True)
    task.spec = spec
    pool = task.replicas
    attempt = new_attempt()
    try:
        name, handle = pool.lease(attempt["token"])
        shards = [s.to_dict() for s in plan_job(task.core_spec).pending[:1]]
        submitted = {}

        def submit_later():  # the replica takes the call up 1.5 s after its lease
            time.sleep(1.5)
            submitted["at"] = time.monotonic()
            submitted["ref"] = handle.run_shards.remote(task.core_spec.to_dict(), None, shards, attempt)

        thread = threading.Thread(target=submit_later)
        started = time.monotonic()
        thread.start()
        outcome = task.call(context(StateStore())).wait_started(api.WorkId(name, attempt["token"]), task.settings.start_timeout_s)
        waited = time.monotonic() - started
        thread.join()
        status = outcome.state
        assert waited >= 1.5 and status in ("RUNNING", "SUCCEEDED"), (waited, status)
        assert not outcome.queued
        ray.get(submitted["ref"])
    finally:
        pool.shutdown(force=True)
