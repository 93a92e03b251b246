"""The ``ray`` connection's default ``runtime_env`` (its extra's), on a local Ray whose workers
do not have the predictor: its module is in a temp dir on no ``PYTHONPATH``, and reaches the
replicas only through the runtime_env the operators give them.

Plan, shard and finalize tasks must all apply the same default (the replicas are keyed by the
effective runtime_env): the replica the plan starts serves the shards, and finalize releases it.
The runtime_env's ``env_vars`` values never reach the task log, only their names.
"""

from __future__ import annotations

import json

import pyarrow.dataset as ds
import pytest

from airflow_batch_provider.operators import batch as batch_mod
from airflow_batch_provider.operators.batch import BatchShardOperator, FinalizeBatchOperator, PlanBatchOperator
from tests.helpers import FakeTI, task_context, write_shipped_predictor

pytestmark = pytest.mark.slow

NEVER_LOGGED = "value-of-a-token-never-logged"


@pytest.fixture
def code(local_ray, tmp_path, monkeypatch):
    monkeypatch.setattr(batch_mod.RayHook, "get_conn", lambda self: None)  # the module's local Ray is connected
    directory = tmp_path / "code"
    predictor = write_shipped_predictor(directory)
    default = {"working_dir": str(directory), "env_vars": {"ABP_FACTOR": "5", "ABP_TOKEN": NEVER_LOGGED}}
    # the connection as written before ray_batch / ray_batch_default: still read, with a deprecation
    monkeypatch.delenv("AIRFLOW_CONN_RAY_BATCH_DEFAULT", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_RAY_DEFAULT", json.dumps({"conn_type": "ray", "extra": {"runtime_env": default}}))
    return {"predictor": predictor, "directory": str(directory)}


def run_job(spec: dict) -> tuple[dict, list[str]]:
    """Plan (starting the replica ahead), every shard task, finalize; returns finalize's result
    and the keys of the replicas each task reached."""
    ti = FakeTI(dag_id="d", run_id="r", task_id="plan")
    plan = PlanBatchOperator(task_id="plan", spec=spec)
    units = plan.execute({"ti": ti})
    keys = [plan.replicas.key]
    for index, unit in enumerate(units):
        shard = BatchShardOperator(task_id="batch.shard", spec=spec, work_unit=unit, deferrable=False)
        shard.execute(task_context(map_index=index))
        keys.append(shard.replicas.key)
    finalize = FinalizeBatchOperator(task_id="finalize", spec=spec, plan_task_id="plan")
    result = finalize.execute({"ti": ti})
    keys.append(finalize.replicas.key)
    return result, keys


def values(sink: str) -> dict[int, float]:
    table = ds.dataset(sink, format="parquet").to_table()
    return dict(zip(table.column("id").to_pylist(), table.column("value").to_pylist(), strict=True))


def test_the_connections_runtime_env_ships_the_code_when_the_spec_has_none(code, jsonl_source, tmp_path, capsys):
    sink = str(tmp_path / "out")
    spec = {"source": jsonl_source, "source_format": "jsonl", "sink": sink, "predictor": code["predictor"], "rows_per_shard": 200,
            "num_cpus": 1, "num_replicas": 1}
    result, keys = run_job(spec)
    logged = capsys.readouterr().out
    assert result["rows_out"] == 380
    assert values(sink) == {i: i * 0.5 * 5 for i in range(380)}  # the connection's env_vars reached the replica too
    assert len(set(keys)) == 1  # plan, shards and finalize reached the same replicas
    assert "Replicas use the runtime_env of the 'ray_default' connection: env_vars (ABP_FACTOR, ABP_TOKEN), working_dir" in logged
    assert "Deprecated: no 'ray_batch_default' connection: the 'ray_default' connection is read instead" in logged
    assert "Released 1 idle replica(s)" in logged  # finalize found the replica the plan started and the shards used
    assert NEVER_LOGGED not in logged


def test_the_specs_own_runtime_env_wins_whole(code, jsonl_source, tmp_path, capsys):
    sink = str(tmp_path / "out")
    own = {"working_dir": code["directory"], "env_vars": {"ABP_FACTOR": "7"}}
    spec = {"source": jsonl_source, "source_format": "jsonl", "sink": sink, "predictor": code["predictor"], "rows_per_shard": 400,
            "num_cpus": 1, "num_replicas": 1, "runtime_env": own}
    run_job(spec)
    assert values(sink) == {i: i * 0.5 * 7 for i in range(380)}  # not merged: the connection's ABP_FACTOR=5 is not used
    logged = capsys.readouterr().out
    assert "Replicas use the spec's runtime_env: env_vars (ABP_FACTOR), working_dir" in logged
    assert NEVER_LOGGED not in logged


def test_a_connection_runtime_env_that_is_not_an_object_fails_the_task_naming_the_connection(monkeypatch, jsonl_source, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_RAY_OTHER", json.dumps({"conn_type": "ray", "extra": {"runtime_env": "s3://bucket/code.zip"}}))
    spec = {"source": jsonl_source, "source_format": "jsonl", "sink": str(tmp_path / "out"), "predictor": "tests.predictors:Doubler"}
    with pytest.raises(batch_mod.BatchInferenceFailure, match="'ray_other' connection.*runtime_env=str.*JSON object"):
        PlanBatchOperator(task_id="plan", spec=spec, ray_conn_id="ray_other").execute({"ti": FakeTI()})
