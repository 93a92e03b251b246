"""What reaches Airflow when a step fails: the core error stays the cause (its type and
message), and an error that no retry can fix (the spec, the data, the checkpoint must change
first) fails the task without retries (``AirflowFailException``); a failure a retry may pass
(a predictor's exception, a store, a node) is retried as before."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_batch_provider.core.api import JobSpec, ReplicaPool, RunState, plan
from airflow_batch_provider.core.errors import InputDataError, PredictorFailedError, StaleCheckpointError
from airflow_batch_provider.operators import batch as batch_mod
from airflow_batch_provider.operators.batch import BatchInferenceException, BatchInferenceFailure, BatchShardOperator, PlanBatchOperator
from tests.helpers import StateStore, rows, task_context


def test_a_stale_checkpoint_fails_the_plan_without_retries(jsonl_source, tmp_path):
    spec = {"source": jsonl_source, "source_format": "jsonl", "sink": str(tmp_path / "out"), "predictor": "tests.predictors:Doubler"}
    PlanBatchOperator(task_id="plan", spec=spec, start_replicas=0).execute(task_context())
    changed = {**spec, "predictor_kwargs": {"factor": 3}}  # another model output, same sink, resume=True
    with pytest.raises(BatchInferenceFailure) as raised:
        PlanBatchOperator(task_id="plan", spec=changed, start_replicas=0).execute(task_context())
    assert isinstance(raised.value, AirflowFailException)
    assert isinstance(raised.value.__cause__, StaleCheckpointError)
    assert str(raised.value) == str(raised.value.__cause__)


def test_a_bad_spec_fails_without_retries():
    task = PlanBatchOperator(task_id="plan", spec={"source": "/in", "sink": "/out", "predictor": "no-colon"}, start_replicas=0)
    with pytest.raises(BatchInferenceFailure) as raised:
        task.execute(task_context())
    assert type(raised.value.__cause__).__name__ == "BatchSpecError"


@pytest.fixture
def shard_task(local_ray, tmp_path, monkeypatch):
    """A one-shard task on the module's local Ray; ``make(lines, **spec)`` builds it."""
    monkeypatch.setattr(batch_mod.RayHook, "get_conn", lambda self: None)
    specs = []

    def make(lines: list[str], **spec_kwargs):
        source = tmp_path / "in" / "rows.jsonl"
        source.parent.mkdir(exist_ok=True)
        source.write_text("\n".join(lines) + "\n")
        spec = JobSpec(source=str(source), source_format="jsonl", sink=str(tmp_path / "out"), batch_size=5, num_cpus=1,
                         num_replicas=1, **{"predictor": "tests.predictors:Doubler", **spec_kwargs})
        specs.append(spec)
        unit = {"label": "the shard", "shards": [s.to_dict() for s in plan(spec).pending]}
        return BatchShardOperator(task_id="batch.shard", spec=spec.to_dict(), work_unit=unit, deferrable=False)

    yield make
    for spec in specs:
        ReplicaPool(spec).shutdown()


@pytest.mark.slow
def test_a_bad_row_on_the_replica_fails_the_task_without_retries_naming_the_line(shard_task):
    lines = [json.dumps(r) for r in rows(6)]
    lines[3] = '{"id": 3, "value": 1.5, "text": "cut'  # malformed JSON on line 4
    task = shard_task(lines)
    store = StateStore()
    with pytest.raises(BatchInferenceFailure) as raised:
        task.execute(task_context(store))
    cause = raised.value.__cause__
    assert isinstance(cause, InputDataError), repr(cause)  # the core's own error crossed Ray with its type
    assert "line 4" in str(cause) and "line 4" in str(raised.value) and "rows.jsonl" in str(raised.value)
    # The replica's record of the call says so too (what a deferred task's trigger reads).
    outcome = task.replicas.status(store[BatchShardOperator.external_id_key])
    assert outcome["state"] == RunState.FAILED and outcome["retryable"] is False


@pytest.mark.slow
def test_a_predictor_exception_is_retried_as_before(shard_task, tmp_path):
    marker = tmp_path / "FAIL"
    marker.write_text("")
    task = shard_task([json.dumps(r) for r in rows(6)], predictor_kwargs={"fail_marker": str(marker), "fail_mod": 5})
    with pytest.raises(BatchInferenceException) as raised:
        task.execute(task_context())
    assert not isinstance(raised.value, AirflowFailException)
    assert isinstance(raised.value.__cause__, PredictorFailedError)
    assert "injected failure" in str(raised.value)


def test_a_deferred_task_fails_without_retries_when_the_replica_said_so():
    task = BatchShardOperator(task_id="s", spec={"source": "/in/*.jsonl", "sink": "/out", "predictor": "tests.predictors:Doubler"},
                              work_unit={"label": "s0", "shards": [{"shard_id": "s0"}]}, deferrable=True)
    final = {"status": "error", "message": "shard(s) s0 failed on Ray: InputDataError: line 4", "retryable": False}
    with pytest.raises(BatchInferenceFailure, match="line 4"):
        task.execute_complete({}, final)
    with pytest.raises(BatchInferenceException) as raised:
        task.execute_complete({}, {**final, "retryable": True})
    assert not isinstance(raised.value, AirflowFailException)

