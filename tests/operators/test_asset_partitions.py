"""Finalize names the partition a templated sink's run wrote on its asset event: the payload a
task sends to Airflow (``task_runner._serialize_outlet_events``), from a sink rendered by the
operator's own template rendering. The scheduler's side (a downstream DAG run per partition)
is tested in tests/deployment/test_scenarios.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk import DAG
from airflow.sdk.execution_time.context import OutletEventAccessors
from airflow.sdk.execution_time.task_runner import _serialize_outlet_events

from airflow_batch_provider import BatchSpec
from airflow_batch_provider.core import api
from airflow_batch_provider.exceptions import BatchInferenceFailure
from airflow_batch_provider.operators.batch import FinalizeBatchOperator
from airflow_batch_provider.task_group import sink_asset
from tests.helpers import FakeTI


def finalize_events(spec: BatchSpec, template_context: dict[str, Any], *, run_key: str | None = None, **kwargs: Any):
    """Render the finalize task as Airflow does, compute and commit the rendered sink's shards,
    run finalize; return the asset events it would send."""
    asset = sink_asset(spec)
    with DAG("partitions", schedule=None):
        task = FinalizeBatchOperator(task_id="finalize", spec=spec, release_replicas=False, outlets=[asset], **kwargs)
    task.render_template_fields(template_context)
    core = task.batch_spec.core()
    runner = api.ShardRunner(core)
    for shard in api.plan(core).pending:
        runner.run(shard, api.new_attempt())
    events = OutletEventAccessors()
    task.execute({"ti": FakeTI(), "outlet_events": events, "dag_run": SimpleNamespace(partition_key=run_key)})
    return task, list(_serialize_outlet_events(events))


@pytest.fixture
def daily_spec(jsonl_source, tmp_path):
    return BatchSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "emb") + "/{{ ds }}",
                     predictor="tests.predictors:Doubler", rows_per_shard=200)


def test_a_templated_sink_names_its_rendered_partition(daily_spec, tmp_path):
    task, events = finalize_events(daily_spec, {"ds": "2026-12-05"})
    (event,) = events
    assert event["dest_asset_key"] == {"name": f"batch_inference:{tmp_path}/emb/{{{{ ds }}}}", "uri": f"file://{tmp_path}/emb"}
    assert event["partition_key"] == "2026-12-05"
    assert event["extra"]["sink"] == f"{tmp_path}/emb/2026-12-05" and event["extra"]["rows_out"] == 380
    assert (tmp_path / "emb" / "2026-12-05" / "_SUCCESS").exists()


def test_a_partitioned_run_keeps_its_own_key(daily_spec):
    """Airflow puts the run's key (and partition_date) on every event of the run: finalize adds none."""
    _, (event,) = finalize_events(daily_spec, {"ds": "2026-12-05"}, run_key="2026-12-05T00:00:00")
    assert "partition_key" not in event


def test_partitioned_asset_false_emits_no_key(daily_spec):
    _, (event,) = finalize_events(daily_spec, {"ds": "2026-12-05"}, partitioned_asset=False)
    assert "partition_key" not in event


def test_an_untemplated_sink_is_unchanged(jsonl_source, tmp_path):
    spec = BatchSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "emb"), predictor="tests.predictors:Doubler",
                     rows_per_shard=200)
    _, (event,) = finalize_events(spec, {"ds": "2026-12-05"})
    assert event["dest_asset_key"]["uri"] == f"file://{tmp_path}/emb" and "partition_key" not in event


def test_a_key_airflow_cannot_take_fails_clearly(jsonl_source, tmp_path):
    spec = BatchSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "emb") + "/{{ params.a }}/{{ params.b }}",
                     predictor="tests.predictors:Doubler", rows_per_shard=200)
    with pytest.raises(BatchInferenceFailure, match="cannot name partition .* partitioned_asset=False"):
        finalize_events(spec, {"params": {"a": "a" * 130, "b": "b" * 130}})  # a key over Airflow's 250 characters
