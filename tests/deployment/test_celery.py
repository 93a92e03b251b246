"""The CeleryExecutor: Redis as the broker, two Celery workers, Postgres, a Ray head.

* One Celery worker dies mid-shard (SIGKILL of the worker, its pool processes and their task
  processes): the scheduler takes the task for dead when its heartbeat stops, and its retry,
  on the other worker, reconnects to the Ray work (which went on) or recomputes only that shard.
* Only the scheduler process dies, the Celery workers (and their running tasks) stay alive: a
  new scheduler finishes the run, with no committed shard computed again.

Figures (rows lost, duplicated, recomputed, wall time) go to the timing report.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.deployment.harness import (
    FINALIZE,
    SHARD,
    assert_each_row_once,
    calls,
    committed,
    kill_only_the_scheduler,
    ray_loaded,
    retry_outcome,
    start_run,
    unit_ids,
    wait_for,
)
from tests.helpers import sink_ids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def figures(scenario, before, after, started: float) -> dict:
    ids = sink_ids(scenario.sink)
    rows = scenario.opts["rows"]
    return {
        "rows_lost": len(set(range(rows)) - set(ids)),
        "rows_duplicated": len(ids) - len(set(ids)),
        "rows_recomputed": sum(n - 1 for n in after.values() if n > 1),
        "wall_s": round(time.monotonic() - started, 1),
    }


def worker_of(deployment, pid: int) -> str | None:
    """The Celery worker (``celery-w<i>``) that started task process ``pid`` (task processes run
    in process groups of their own, so by ancestry)."""
    import psutil

    try:
        ancestors = {proc.pid for proc in psutil.Process(pid).parents()}
    except psutil.NoSuchProcess:
        return None
    return next((name for name, proc in deployment.procs.items() if name.startswith("celery-") and proc.pid in ancestors), None)


def task_pids() -> dict[str, int]:
    """ti id -> pid of every task runner process on this machine (``airflow worker -- <ti id>``)."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or []).strip()
        if cmdline.startswith("airflow worker -- "):
            found[cmdline.rsplit(" ", 1)[-1]] = proc.info["pid"]
    return found


@pytest.mark.dag("celery_worker_kill")
def test_celery_worker_killed_mid_shard(celery_deployment, celery_client, scenario):
    deployment, client = celery_deployment, celery_client
    started = time.monotonic()
    run_id = start_run(client, scenario.dag_id)
    wait_for(lambda: [t for t in client.shard_tis(scenario.dag_id, run_id, SHARD) if t["map_index"] >= 0], 240, what="mapped shard tasks")
    plan = unit_ids(client, scenario.dag_id, run_id)

    def victim():
        """A running shard mid-compute (its first batch done), and the Celery worker running it."""
        done, pids = calls(scenario.calls_log), task_pids()
        for ti in client.shard_tis(scenario.dag_id, run_id, SHARD):
            ids = plan[ti["map_index"]]["ids"]
            if ti["state"] == "running" and any(done[i] for i in ids) and not all(done[i] for i in ids) and ti["id"] in pids:
                worker = worker_of(deployment, pids[ti["id"]])
                if worker:
                    return ti, worker
        return None

    ti, worker = wait_for(victim, 240, interval=0.2, what="a running shard mid-compute on a Celery worker")
    index = ti["map_index"]
    done_before = committed(scenario.sink)
    calls_before = calls(scenario.calls_log)
    deployment.kill_component(worker, signal.SIGKILL, descendants=True)  # the worker, its pool and its task processes
    assert not task_pids().get(ti["id"])
    scenario.timings["killed"] = worker
    assert client.wait_run(scenario.dag_id, run_id, timeout=480) == "success"

    after = calls(scenario.calls_log)
    tries = client.tries(scenario.dag_id, run_id, SHARD, index)
    assert max(t["try_number"] for t in tries) == 2, tries
    outcome = retry_outcome(client.log_text(scenario.dag_id, run_id, SHARD, 2, index))
    twice = sorted(i for i, n in after.items() if n > 1)
    assert set(twice) <= set(plan[index]["ids"]), f"rows of other shards recomputed: {twice}"
    if outcome != "recomputed":
        assert not twice, f"reconnected, yet ids computed twice: {twice}"
    for other, unit in plan.items():
        if other != index and set(unit["shard_ids"]) <= done_before:
            assert all(after[i] == calls_before[i] for i in unit["ids"]), f"committed shard {other} computed again"
    assert_each_row_once(scenario.sink, scenario.opts["rows"])
    assert client.xcom(scenario.dag_id, run_id, FINALIZE)["rows_out"] == scenario.opts["rows"]
    scenario.timings.update(retry=outcome, **figures(scenario, calls_before, after, started))


@pytest.mark.dag("celery_scheduler_kill")
def test_only_the_scheduler_killed_workers_alive(celery_deployment, celery_client, scenario):
    """SIGKILL the scheduler process alone while shards run on the Celery workers; a new
    scheduler finishes the run; no committed shard is computed again."""
    kill_only_the_scheduler(celery_deployment, celery_client, scenario)
    assert scenario.timings["celery_workers_alive"]  # at least one worker (the other test may have killed one)
    assert scenario.timings["kill_to_success_s"] < 240


def test_no_forking_celery_process_has_ray_loaded(celery_deployment):
    """After the shard tasks above ran, neither a Celery worker nor its prefork pool processes
    (which fork each task's supervisor and task process), nor the scheduler, DAG processor,
    triggerer or api-server, has Ray loaded: only task processes, which run shards, load it."""
    pgids = celery_deployment.airflow_pgids()
    assert any(name.startswith("celery-") for name in celery_deployment.procs)
    assert not ray_loaded(pgids), ray_loaded(pgids)
