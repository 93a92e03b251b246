"""The operators hand the core what keeps runs apart: the run's reset key, the plan's id."""

from __future__ import annotations

import os

import pytest

from airflow_batch_provider.core.api import ReplicaPool
from airflow_batch_provider.exceptions import BatchInferenceException
from airflow_batch_provider.operators import batch as batch_mod
from airflow_batch_provider.operators.batch import BatchShardOperator, PlanBatchOperator
from tests.helpers import StateStore, make_spec, task_context


def plan_context(run_id: str, try_number: int = 1):
    return task_context(try_number=try_number, run_id=run_id, task_id="batch.plan", map_index=-1)


def test_plan_task_resets_once_per_dag_run(jsonl_source, tmp_path):
    spec = make_spec(jsonl_source, str(tmp_path / "out"), resume=False)
    plan = PlanBatchOperator(task_id="batch.plan", spec=spec.to_dict(), start_replicas=0)
    units = plan.execute(plan_context("run-1"))
    assert len(units) == 5 and {u["plan_id"] for u in units} == {units[0]["plan_id"]}
    reset = open(os.path.join(spec.checkpoint_root, "reset.json")).read()
    assert "d/run-1/batch.plan" in reset
    retried = PlanBatchOperator(task_id="batch.plan", spec=spec.to_dict(), start_replicas=0)
    assert len(retried.execute(plan_context("run-1", try_number=2))) == 5
    assert open(os.path.join(spec.checkpoint_root, "reset.json")).read() == reset  # not reset again


def test_a_shard_task_of_a_replaced_plan_fails_and_commits_nothing(local_ray, jsonl_source, tmp_path, monkeypatch):
    monkeypatch.setattr(batch_mod.RayHook, "get_conn", lambda self: None)
    spec = make_spec(jsonl_source, str(tmp_path / "out"), num_replicas=1)
    unit = PlanBatchOperator(task_id="batch.plan", spec=spec.to_dict(), start_replicas=0).execute(plan_context("r"))[0]
    # the DAG is edited (rows_per_shard) and a new run plans before this shard task runs
    newer = make_spec(jsonl_source, str(tmp_path / "out"), rows_per_shard=50, num_replicas=1)
    PlanBatchOperator(task_id="batch.plan", spec=newer.to_dict(), start_replicas=0).execute(plan_context("r2"))
    task = BatchShardOperator(task_id="batch.shard", spec=spec.to_dict(), work_unit=unit, deferrable=False)
    try:
        with pytest.raises(BatchInferenceException, match="replaced by a plan without this shard"):
            task.execute(task_context(StateStore(), try_number=1))
    finally:
        ReplicaPool(spec).shutdown()
    assert not [n for n in os.listdir(spec.sink_root) if n.startswith("part-")]
    assert not os.listdir(os.path.join(spec.checkpoint_root, "shards"))


def test_a_map_index_mapped_anew_by_a_rerun_plan_computes_its_own_shards(local_ray, jsonl_source, tmp_path, monkeypatch):
    """A cleared DAG run re-runs the plan, which maps only the pending shards: map index 0's
    stored Ray call (of another shard, succeeded) must not stand in for the new unit."""
    monkeypatch.setattr(batch_mod.RayHook, "get_conn", lambda self: None)
    spec = make_spec(jsonl_source, str(tmp_path / "out"), num_replicas=1)
    units = PlanBatchOperator(task_id="batch.plan", spec=spec.to_dict(), start_replicas=0).execute(plan_context("r"))
    store = StateStore()
    try:
        first = BatchShardOperator(task_id="batch.shard", spec=spec.to_dict(), work_unit=units[0], deferrable=False)
        assert first.execute(task_context(store, try_number=1))["computed"] == 1
        # the run is cleared: the plan maps the 4 pending shards, units[1] now at map index 0
        again = PlanBatchOperator(task_id="batch.plan", spec=spec.to_dict(), start_replicas=0).execute(plan_context("r", 2))
        assert again[0]["shards"] == units[1]["shards"]
        second = BatchShardOperator(task_id="batch.shard", spec=spec.to_dict(), work_unit=again[0], deferrable=False)
        summary = second.execute(task_context(store, try_number=2))
    finally:
        ReplicaPool(spec).shutdown()
    assert summary["shards"] == [s["shard_id"] for s in units[1]["shards"]] and summary["computed"] == 1
