"""Many shard tasks start at once through a real scheduler, run after run, and none fails.

A LocalExecutor forks each task process from the scheduler. Ray's core library, once loaded
in the scheduler (Airflow loads plugins and providers there), is inherited by every forked
task, and a task connecting to Ray from such a child was aborted by Ray now and then
(``plasma_store_provider.cc:92 Check failed: WarmupStore() ... Seal() called on an object
without a reference to it``: a C++ abort, no retry catches it). Here 24 shard tasks of one
run start as fast as ``parallelism=8`` lets them, three runs in a row, with no task retries:
any abort fails the run. The scheduler is then killed and restarted while shards run, so that
the orphaned tasks it resets start together. Afterwards no Airflow process that forks others
(scheduler, its executor workers, DAG processor, triggerer, api-server) has Ray loaded.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.deployment.harness import SHARD, AirflowClient, assert_each_row_once, ray_loaded, running_deployment, start_run, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

DAG_ID = "deploy_many_starts"
ROWS = 240  # 24 shards of 10 rows
RUNS = 3
DAGS = {DAG_ID: {"rows": ROWS, "sleep_s": 0.0, "retries": 0, "num_replicas": 4}}


@pytest.fixture(scope="module")
def many():
    with running_deployment("abp-starts-", DAGS, parallelism=8) as dep:
        yield dep, AirflowClient(dep.base_url)


def _fresh_sink(dep) -> None:
    import shutil

    shutil.rmtree(dep.root / "data" / DAG_ID / "out", ignore_errors=True)


def _finish(client: AirflowClient, run_id: str, figures: dict) -> None:
    state = client.wait_run(DAG_ID, run_id, timeout=600)
    tis = client.shard_tis(DAG_ID, run_id, SHARD)
    failed = [(t["map_index"], t["state"], t["try_number"]) for t in tis if t["state"] != "success"]
    figures.setdefault("shard_tasks", []).append(len(tis))
    figures.setdefault("failed_tries", []).append(len(failed))
    assert state == "success" and not failed, f"run {run_id}: {state}; shard tasks not successful: {failed}"


def test_many_shard_tasks_start_together_without_a_failed_try(many):
    dep, client = many
    client.wait_dag(DAG_ID)
    sink = dep.root / "data" / DAG_ID / "out"
    figures: dict = {}
    started = time.monotonic()
    for _ in range(RUNS):
        _fresh_sink(dep)
        run_id = start_run(client, DAG_ID)
        _finish(client, run_id, figures)
        assert_each_row_once(sink, ROWS)
    assert not ray_loaded(dep.airflow_pgids()), ray_loaded(dep.airflow_pgids())

    # A scheduler killed with its workers and tasks: the new one resets the orphaned shard
    # tasks, and they start together.
    _fresh_sink(dep)
    run_id = start_run(client, DAG_ID)
    wait_for(lambda: sum(t["state"] == "running" for t in client.shard_tis(DAG_ID, run_id, SHARD)) >= 4, 300, interval=0.2,
             what="four shard tasks running")
    dep.kill_component("scheduler", signal.SIGKILL, descendants=True)
    restarted = time.time()
    dep.start_component("scheduler")
    dep.wait_new_scheduler(restarted)
    state = client.wait_run(DAG_ID, run_id, timeout=600)
    tis = client.shard_tis(DAG_ID, run_id, SHARD)
    failed = [(t["map_index"], t["state"], t["try_number"]) for t in tis if t["state"] != "success"]
    figures["after_scheduler_kill"] = {"reset_and_restarted": sum(t["try_number"] > 1 for t in tis), "failed": len(failed)}
    assert state == "success" and not failed, f"run after the scheduler kill: {state}; {failed}"
    assert_each_row_once(sink, ROWS)
    assert not ray_loaded(dep.airflow_pgids()), ray_loaded(dep.airflow_pgids())
    figures["wall_s"] = round(time.monotonic() - started, 1)
    print(f"many starts: {figures}")
