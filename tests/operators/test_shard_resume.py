"""A retry of a shard task whose earlier try died before recording its Ray call (on a local Ray)."""

from __future__ import annotations

import collections
import json
from types import SimpleNamespace

import pytest

from airflow_batch_provider.core.api import JobSpec, ReplicaPool, Shard, new_attempt, plan
from airflow_batch_provider.operators import batch as batch_mod
from airflow_batch_provider.operators.batch import BatchInferenceException, BatchShardOperator, attempt_key, unit_id
from tests.helpers import StateStore, task_context


@pytest.fixture
def job(local_ray, jsonl_source, tmp_path, monkeypatch):
    monkeypatch.setattr(batch_mod.RayHook, "get_conn", lambda self: None)  # the module's local Ray is connected
    calls = tmp_path / "calls.log"
    spec = JobSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"), predictor="tests.predictors:SlowDoubler",
                     predictor_kwargs={"sleep_s": 1.0, "calls_log": str(calls)}, batch_size=5, rows_per_shard=10, num_cpus=1, num_replicas=2)
    unit = {"label": "first shard", "shards": [plan(spec).pending[0].to_dict()]}
    yield SimpleNamespace(spec=spec, unit=unit, calls=calls)
    ReplicaPool(spec).shutdown()


def row_calls(calls_log) -> collections.Counter:
    counter: collections.Counter = collections.Counter()
    for line in calls_log.read_text().splitlines():
        counter.update(json.loads(line))
    return counter


def test_retry_reconnects_to_work_whose_id_was_never_stored(job, capsys):
    # Try 1 submitted its shard to Ray and died before task_state_store.set.
    first = new_attempt(attempt_key(task_context(StateStore(), try_number=1)["ti"], unit_id(job.unit)), try_number=1)
    pool = ReplicaPool(job.spec)
    work = pool.submit([Shard.from_dict(job.unit["shards"][0])], first)
    while pool.status(work).get("queued"):
        pass

    store = StateStore()
    task = BatchShardOperator(task_id="batch.shard", spec=job.spec.to_dict(), work_unit=job.unit, deferrable=False)
    summary = task.execute(task_context(store, try_number=2))

    assert "Reconnecting to running Ray work" in capsys.readouterr().out
    assert store[BatchShardOperator.external_id_key] == {"worker": work["worker"], "token": first["token"], "unit": unit_id(job.unit)}
    assert summary["computed"] == 1 and summary["rows_out"] == 10
    assert sorted(row_calls(job.calls).items()) == [(i, 1) for i in range(10)]  # each row computed once


def test_retry_with_nothing_running_submits_and_a_first_try_asks_nobody(job, monkeypatch):
    store = StateStore()
    task = BatchShardOperator(task_id="batch.shard", spec=job.spec.to_dict(), work_unit=job.unit, deferrable=False)
    assert task.execute(task_context(store, try_number=2))["computed"] == 1  # nothing of an earlier try on Ray: computed now

    monkeypatch.setattr(ReplicaPool, "find_running", lambda *a, **k: pytest.fail("a first try asked the replicas"))
    again = BatchShardOperator(task_id="batch.shard", spec=job.spec.to_dict(), work_unit=job.unit, deferrable=False)
    assert again.execute(task_context(StateStore(), try_number=1))["computed"] == 0  # committed by the run above
    assert sorted(row_calls(job.calls).items()) == [(i, 1) for i in range(10)]


def test_work_lost_while_waiting_is_resubmitted_and_the_new_call_recorded(monkeypatch):
    """Sync path: the reconnected call vanishes (its replica restarted); the task submits again,
    records the new call in task_state_store and waits for that one, not the old."""
    unit = {"label": "s0", "shards": []}
    task = BatchShardOperator(task_id="batch.shard", spec={"source": "/in/a.jsonl", "sink": "/out", "predictor": "m:C"},
                              work_unit=unit, deferrable=False)
    waited: list[str] = []
    result = {"shard_id": "s0", "status": "computed", "rows_in": 1, "rows_out": 1, "bytes": 1, "seconds": 1.0, "model_seconds": 1.0}

    class Pool:
        def status(self, work):
            return {"state": "RUNNING"}

        def result(self, work, **progress):
            waited.append(work["token"])
            return None if work["token"] == "old" else [result]

        def find_running(self, key):
            return None

        def submit(self, shards, attempt, options, **lease):
            return {"worker": "w2", "token": "new"}

    monkeypatch.setattr(batch_mod.RayHook, "get_conn", lambda self: None)
    task.__dict__["replicas"] = Pool()
    store = StateStore({BatchShardOperator.external_id_key: {"worker": "w1", "token": "old"}})
    summary = task.execute(task_context(store, try_number=2))
    assert waited == ["old", "new"]
    assert store[BatchShardOperator.external_id_key] == {"worker": "w2", "token": "new", "unit": unit_id(unit)}
    assert summary["computed"] == 1


def test_a_first_try_whose_call_is_lost_returns_the_results_of_the_call_that_replaced_it(monkeypatch):
    """Sync path, fresh submission: the first call is lost, the second computes the shard; the
    task's summary is the second call's (not the lost call's empty answer)."""
    unit = {"label": "s0", "shards": []}
    task = BatchShardOperator(task_id="batch.shard", spec={"source": "/in/a.jsonl", "sink": "/out", "predictor": "m:C"},
                              work_unit=unit, deferrable=False)
    result = {"shard_id": "s0", "status": "computed", "rows_in": 3, "rows_out": 3, "bytes": 1, "seconds": 1.0, "model_seconds": 1.0}
    pool = task.__dict__["replicas"] = LosingPool()
    pool.result = lambda work, **progress: None if work["token"] == pool.submitted[0] else [result]
    pool.status = lambda work: {"state": "LOST"}
    monkeypatch.setattr(batch_mod.RayHook, "get_conn", lambda self: None)
    store = StateStore()
    summary = task.execute(task_context(store, try_number=1))
    assert len(pool.submitted) == 2 and store[BatchShardOperator.external_id_key]["token"] == pool.submitted[1]
    assert summary["computed"] == 1 and summary["rows_out"] == 3


class LosingPool:
    """Every call it starts is lost (its replica's node dies); records what the task asks."""

    def __init__(self):
        self.submitted: list[str] = []
        self.cancelled: list[dict] = []

    def status(self, work):
        return {"state": "RUNNING"}

    def result(self, work, **progress):
        return None

    def find_running(self, key):
        return None

    def submit(self, shards, attempt, options, **lease):
        self.submitted.append(attempt["token"])
        return {"worker": f"w{len(self.submitted)}", "token": attempt["token"]}

    def cancel(self, work):
        self.cancelled.append(work)
        return "FAILED"


def test_work_lost_more_often_than_max_retries_fails_the_try(monkeypatch):
    """A call lost with its node is submitted again in the same try, at most the spec's max_retries times."""
    task = BatchShardOperator(task_id="batch.shard", spec={"source": "/in/a.jsonl", "sink": "/out", "predictor": "m:C", "max_retries": 2},
                              work_unit={"label": "s0", "shards": []}, deferrable=False)
    monkeypatch.setattr(batch_mod.RayHook, "get_conn", lambda self: None)
    pool = task.__dict__["replicas"] = LosingPool()
    with pytest.raises(BatchInferenceException, match=r"lost 3 times .* max_retries=2"):
        task.execute(task_context(StateStore(), try_number=1))
    assert len(pool.submitted) == 3  # the first call and two resubmissions


def test_on_kill_cancels_the_ray_call_it_follows(monkeypatch):
    """Stopping the task (on_kill, also raised by execution_timeout inside the wait) cancels its Ray call."""
    task = BatchShardOperator(task_id="batch.shard", spec={"source": "/in/a.jsonl", "sink": "/out", "predictor": "m:C"},
                              work_unit={"label": "s0", "shards": []}, deferrable=False)
    monkeypatch.setattr(batch_mod.RayHook, "get_conn", lambda self: None)
    pool = task.__dict__["replicas"] = LosingPool()

    def killed_while_waiting(work, **progress):
        raise KeyboardInterrupt  # stands in for AirflowTaskTimeout / the SIGTERM handler

    pool.result = killed_while_waiting
    with pytest.raises(KeyboardInterrupt):
        task.execute(task_context(StateStore(), try_number=1))
    assert pool.cancelled == [{"worker": "w1", "token": pool.submitted[0], "unit": unit_id(task.work_unit)}]
    task.on_kill()  # nothing left to cancel: no second call
    assert len(pool.cancelled) == 1
