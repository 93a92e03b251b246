"""Module fixtures: a real deployment (Postgres, Ray head, four Airflow components) for all
deployment scenarios, the DAGs they run, and a timing report printed at the end."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.deployment.harness import TIMING_FILES, TIMINGS, AirflowClient, running_deployment

#: The DAGs of the scenarios: rows, shard size, seconds per batch (SlowDoubler), options.
SCENARIO_DAGS: dict[str, dict[str, Any]] = {
    # 8 shards of 3 batches (4, 4, 2 rows) x 1 s; two at a time (max_active_tis_per_dagrun)
    "deploy_scheduler_kill": {"rows": 80, "sleep_s": 1.0, "batch_size": 4, "max_active_shards": 2},
    # 3 shards of 2 batches x 3 s
    "deploy_task_kill": {"rows": 30, "sleep_s": 3.0, "max_active_shards": 3, "num_replicas": 3},
    # 6 shards; the batches holding id 0 and 35 fail while the marker file exists; no retries
    "deploy_clear_failed": {"rows": 60, "sleep_s": 0.2, "retries": 0, "fail_mod": 35, "max_active_shards": 3, "num_replicas": 3},
    # the same, with resume=False (one retry, so that only the injected failure fails a shard):
    # the cleared run keeps its own work, a new run starts fresh
    "deploy_resume_false": {"rows": 60, "sleep_s": 0.2, "retries": 1, "fail_mod": 35, "max_active_shards": 3,
                            "num_replicas": 3, "resume": False},
    # 5 deferrable shards of 2 batches x 4 s, five model replicas, no cap
    "deploy_deferrable": {"rows": 50, "sleep_s": 4.0, "deferrable": True, "num_replicas": 5},
    # 1 deferrable shard of 5 batches x 6 s, marked failed by a user while it computes
    "deploy_deferred_mark_failed": {"rows": 10, "sleep_s": 6.0, "batch_size": 2, "deferrable": True, "retries": 0},
    # 4 shards in a 1-slot pool ("one GPU")
    "deploy_pool_cap": {"rows": 40, "sleep_s": 1.0, "pool": "gpu_slots", "num_replicas": 2},
    # 8 shards of 3 batches x 1 s, two at a time: only the scheduler process is killed
    "deploy_scheduler_only_kill": {"rows": 80, "sleep_s": 1.0, "batch_size": 4, "max_active_shards": 2},
}

#: The DAGs of the CeleryExecutor deployment (two Celery workers): same format.
CELERY_DAGS: dict[str, dict[str, Any]] = {
    # 6 shards of 2 batches x 2 s, two at a time; one retry (the killed worker's shard)
    "celery_worker_kill": {"rows": 60, "sleep_s": 2.0, "max_active_shards": 2, "retries": 1},
    # 8 shards of 3 batches (4, 4, 2 rows) x 1 s, two at a time
    "celery_scheduler_kill": {"rows": 80, "sleep_s": 1.0, "batch_size": 4, "max_active_shards": 2},
}


# Module scope: each deployment (scheduler, API server, triggerer, dag processor, workers) is
# stopped once its test module ends, instead of loading the machine through the rest of the suite.
@pytest.fixture(scope="module")
def deployment():
    with running_deployment("abp-deploy-", SCENARIO_DAGS, dag_files=("partition_dags.py",)) as dep:
        yield dep


@pytest.fixture(scope="module")
def celery_deployment():
    """CeleryExecutor on the local Redis, two Celery workers; a task whose heartbeat stops
    (its worker died) is taken for dead after 20 s."""
    with running_deployment("abp-celery-", CELERY_DAGS, executor="CeleryExecutor", celery_workers=2, heartbeat_timeout_s=20) as dep:
        yield dep


@pytest.fixture(scope="module")
def celery_client(celery_deployment) -> AirflowClient:
    return AirflowClient(celery_deployment.base_url)


@pytest.fixture(scope="module")
def client(deployment) -> AirflowClient:
    return AirflowClient(deployment.base_url)


@pytest.fixture
def scenario(request):
    """The scenario's DAG (parsed and unpaused), its paths, and a timer for the report."""
    dag_id = request.node.get_closest_marker("dag").args[0]
    celery = dag_id in CELERY_DAGS
    deployment = request.getfixturevalue("celery_deployment" if celery else "deployment")
    client = request.getfixturevalue("celery_client" if celery else "client")
    base = deployment.root / "data" / dag_id
    client.wait_dag(dag_id)
    started = time.monotonic()

    class Scenario:
        pass

    s = Scenario()
    s.dag_id = dag_id
    s.base = base
    s.sink = base / "out"
    s.calls_log = base / "calls.log"
    s.opts = (CELERY_DAGS if celery else SCENARIO_DAGS)[dag_id]
    s.timings = {}
    yield s
    s.timings["test_s"] = round(time.monotonic() - started, 1)
    TIMINGS[request.node.name] = s.timings


def pytest_terminal_summary(terminalreporter):
    if not TIMINGS:
        return
    terminalreporter.write_sep("=", "deployment timings (seconds)")
    for name, values in TIMINGS.items():
        terminalreporter.write_line(f"{name}: {json.dumps(values)}")
    if TIMING_FILES:
        terminalreporter.write_line(f"(also in {TIMING_FILES[0]})")
