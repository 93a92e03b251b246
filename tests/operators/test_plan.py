"""PlanBatchOperator: the mapped work units, and the model replicas it starts ahead."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_batch_provider.operators import batch as batch_mod
from airflow_batch_provider.operators.batch import PlanBatchOperator, work_units
from airflow_batch_provider.task_group import batch_inference
from tests.helpers import FakeTI


@pytest.fixture
def started(monkeypatch):
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(batch_mod.RayHook, "get_conn", lambda self: calls.append(("connect", 0)))
    monkeypatch.setattr(batch_mod.api.ReplicaPool, "start", lambda pool, wanted: calls.append(("start", wanted)) or ["abp-x-0"])
    return calls


def plan(source: str, sink: str, **kwargs: Any) -> tuple[list[dict[str, Any]], FakeTI]:
    spec = {"source": source, "source_format": "jsonl", "sink": sink, "predictor": "tests.predictors:Doubler", "rows_per_shard": 100}
    ti = FakeTI()
    units = PlanBatchOperator(task_id="plan", spec=spec, **kwargs).execute({"ti": ti})
    return units, ti


def test_plan_starts_replicas_for_the_pending_units(started, jsonl_source, tmp_path):
    units, ti = plan(jsonl_source, str(tmp_path / "out"))
    assert len(units) == 5 and ti.xcom["summary"]["pending_rows"] == 380
    assert started == [("connect", 0), ("start", 5)]


def test_plan_can_leave_replicas_to_the_shard_tasks(started, jsonl_source, tmp_path):
    plan(jsonl_source, str(tmp_path / "out"), start_replicas=0)
    assert started == []


def test_plan_starts_no_more_replicas_than_asked(started, jsonl_source, tmp_path):
    plan(jsonl_source, str(tmp_path / "out"), start_replicas=2)
    assert started == [("connect", 0), ("start", 2)]


def test_plan_with_nothing_pending_starts_nothing(started, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.jsonl").write_text("")
    units, _ = plan(str(tmp_path / "in"), str(tmp_path / "out"))
    assert units == [] and started == []


def test_unreachable_ray_is_a_warning_not_a_failed_plan(monkeypatch, jsonl_source, tmp_path, capsys):
    def refuse(self):
        raise ConnectionError("Could not reach Ray at 10.0.0.9:6379")

    monkeypatch.setattr(batch_mod.RayHook, "get_conn", refuse)
    units, _ = plan(jsonl_source, str(tmp_path / "out"))
    assert len(units) == 5
    logged = capsys.readouterr().out  # the task logger (structlog) writes to stdout here
    assert "Could not start replicas ahead (ConnectionError: Could not reach Ray at 10.0.0.9:6379)" in logged


def test_resources_no_node_has_fail_the_plan(monkeypatch, jsonl_source, tmp_path):
    """Unlike an unreachable Ray, a cluster that cannot hold one replica fails the plan at once."""

    def infeasible(pool, wanted):
        raise batch_mod.api.ResourcesUnavailableError("no node of the Ray cluster can run a replica: it asks for num_gpus=1")

    monkeypatch.setattr(batch_mod.RayHook, "get_conn", lambda self: None)
    monkeypatch.setattr(batch_mod.api.ReplicaPool, "start", infeasible)
    with pytest.raises(batch_mod.BatchInferenceException, match="num_gpus=1"):
        plan(jsonl_source, str(tmp_path / "out"))


@pytest.mark.parametrize(
    "caps, ahead",
    [({}, None), ({"max_active_shards": 3}, 3), ({"pool": "gpu_slots"}, 1), ({"pool": "gpu_slots", "max_active_shards": 2}, 2)],
)
def test_batch_inference_starts_no_more_replicas_than_shards_can_run(caps, ahead):
    from airflow.sdk import DAG

    from airflow_batch_provider import BatchSpec

    with DAG("d", schedule=None):
        spec = BatchSpec(source="/in/*.jsonl", sink="/out", predictor="tests.predictors:Doubler")
        group = batch_inference(spec, ray_conn_id="ray_gpu", **caps)
    plan_task = group.children["batch_inference.plan"]
    assert plan_task.ray_conn_id == "ray_gpu" and plan_task.start_replicas == ahead


def test_more_shards_than_max_map_length_share_tasks(tmp_path, jsonl_source):
    from airflow_batch_provider.core.api import JobSpec, plan

    spec = JobSpec(source=jsonl_source, sink=str(tmp_path / "out"), predictor="tests.predictors:Doubler",
                     source_format="jsonl", rows_per_shard=3)  # 127 shards
    pending = plan(spec).pending
    units = work_units(pending, max_tasks=50)
    assert len(units) <= 50
    assert sorted(s["shard_id"] for u in units for s in u["shards"]) == sorted(s.shard_id for s in pending)
    assert "shards:" in units[0]["label"]
    assert [u["label"] for u in work_units(pending[:2], 50)] == [s.description for s in pending[:2]]


def test_shards_per_task_groups_shards_apart_from_max_map_length(tmp_path, jsonl_source):
    from airflow_batch_provider.core.api import JobSpec, plan

    spec = JobSpec(source=jsonl_source, sink=str(tmp_path / "out"), predictor="tests.predictors:Doubler",
                     source_format="jsonl", rows_per_shard=10)  # 25 + 13 shards
    pending = plan(spec).pending
    assert len(pending) == 38
    units = work_units(pending, max_tasks=1024, shards_per_task=8)
    assert [len(u["shards"]) for u in units] == [8, 8, 8, 8, 6]
    assert [s["shard_id"] for u in units for s in u["shards"]] == [s.shard_id for s in pending]  # plan order kept
    assert len(work_units(pending, max_tasks=2, shards_per_task=8)) == 2  # the cap still wins
    with pytest.raises(ValueError, match="shards_per_task"):
        PlanBatchOperator(task_id="plan", spec=spec.to_dict(), shards_per_task=0)


def test_batch_inference_passes_shards_per_task_to_the_plan():
    from airflow.sdk import DAG

    from airflow_batch_provider import BatchSpec

    with DAG("d", schedule=None):
        group = batch_inference(BatchSpec(source="/in/*.jsonl", sink="/out", predictor="m:C"), shards_per_task=4)
    assert group.children["batch_inference.plan"].shards_per_task == 4


def test_start_workers_is_the_deprecated_name_of_start_replicas(started, jsonl_source, tmp_path):
    with pytest.warns(DeprecationWarning, match="PlanBatchOperator: 'start_workers' is deprecated, use 'start_replicas'") as warned:
        plan(jsonl_source, str(tmp_path / "out"), start_workers=2)
    assert started == [("connect", 0), ("start", 2)]
    assert any(w.filename == __file__ for w in warned)
    with pytest.raises(TypeError, match="give only 'start_replicas'"):
        PlanBatchOperator(task_id="plan", spec={}, start_workers=2, start_replicas=2)


def test_release_workers_is_the_deprecated_name_of_release_replicas():
    from airflow_batch_provider.operators.batch import FinalizeBatchOperator

    spec = {"source": "/in/*.jsonl", "sink": "/out", "predictor": "tests.predictors:Doubler"}
    assert FinalizeBatchOperator(task_id="finalize", spec=spec).release_replicas is True
    with pytest.warns(DeprecationWarning, match="FinalizeBatchOperator: 'release_workers' is deprecated, use 'release_replicas'"):
        assert FinalizeBatchOperator(task_id="finalize", spec=spec, release_workers=False).release_replicas is False
    with pytest.raises(TypeError, match="give only 'release_replicas'"):
        FinalizeBatchOperator(task_id="finalize", spec=spec, release_workers=False, release_replicas=True)
