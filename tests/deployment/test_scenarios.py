"""A real deployment carries a batch job across scheduler restarts, task crashes and UI retries.

Airflow 3.3 components (api-server, scheduler, dag-processor, triggerer; LocalExecutor) on
PostgreSQL, a Ray head, driven only through the REST API v2 (see ``harness.py``). The DAGs
run ``batch_inference`` with ``tests.predictors.SlowDoubler``, which sleeps per batch (so
shards take seconds) and logs every call, so each test can tell exactly which rows were
computed how often. Timings are printed at the end of the session.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import time

import pytest

from tests.deployment.harness import (
    FINALIZE,
    PLAN,
    SHARD,
    TIMINGS,
    AirflowClient,
    Deployment,
    assert_each_row_once,
    calls,
    committed,
    kill_only_the_scheduler,
    max_overlap,
    retry_outcome,
    start_run,
    task_pid,
    unit_ids,
    wait_for,
)
from tests.helpers import write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


# -- scenario 1 -------------------------------------------------------------------------------
@pytest.mark.dag("deploy_scheduler_kill")
def test_1_scheduler_sigkill_mid_run(deployment: Deployment, client: AirflowClient, scenario):
    """SIGKILL the scheduler while shards run; a new scheduler finishes the run; nothing committed recomputes.

    The scheduler is killed with its LocalExecutor workers and their task processes (as when
    its host or container dies); the Ray work of the running shards goes on. The new scheduler
    resets the orphaned task instances, their next try reconnects (task_state_store).
    """
    started = time.monotonic()
    run_id = start_run(client, scenario.dag_id)

    def some_done_one_mid_shard():
        """A committed shard, and a running one in the middle of its Ray work: a batch done (the
        predictor logs a batch when it ends) and the last one not, so it still has a batch (1 s)
        to go when the kill lands a few ms later. (A shard seen "running" in its last moments
        would finish first and never be retried; one still starting up has nothing on Ray.)"""
        tis = client.shard_tis(scenario.dag_id, run_id, SHARD)
        if "success" not in {t["state"] for t in tis} or not committed(scenario.sink):
            return None
        plan, seen = unit_ids(client, scenario.dag_id, run_id), calls(scenario.calls_log)
        mid = [
            t["map_index"] for t in tis
            if t["state"] == "running" and 0 < sum(bool(seen[i]) for i in plan[t["map_index"]]["ids"]) < len(plan[t["map_index"]]["ids"])
        ]
        return (tis, mid) if mid else None

    tis_before, mid_shard = wait_for(some_done_one_mid_shard, 240, interval=0.2, what="a committed shard and one mid-way on Ray")
    done_before = committed(scenario.sink)  # read before the calls: a shard committed here has all its calls in calls_before
    calls_before = calls(scenario.calls_log)
    killed = deployment.kill_component("scheduler", signal.SIGKILL)
    n_pending = sum(t["state"] in (None, "scheduled", "queued") for t in tis_before)
    scenario.timings["killed_scheduler_pid"] = killed
    time.sleep(2)
    tick = time.monotonic()
    restarted_at = time.time()
    deployment.start_component("scheduler")
    deployment.wait_new_scheduler(restarted_at)
    scenario.timings["scheduler_restart_s"] = round(time.monotonic() - tick, 1)

    assert client.wait_run(scenario.dag_id, run_id, timeout=480) == "success"
    scenario.timings["run_s"] = round(time.monotonic() - started, 1)

    plan = unit_ids(client, scenario.dag_id, run_id)
    after = calls(scenario.calls_log)
    recomputed = []
    for unit in plan.values():
        if set(unit["shard_ids"]) <= done_before:
            recomputed += [i for i in unit["ids"] if after[i] != calls_before[i]]
    assert not recomputed, f"committed shards computed again after the restart: ids {recomputed[:10]}"
    assert_each_row_once(scenario.sink, scenario.opts["rows"])
    finalize = client.xcom(scenario.dag_id, run_id, FINALIZE)
    assert finalize["rows_out"] == scenario.opts["rows"]
    # the cap of the DAG (max_active_tis_per_dagrun=2) held across the restart
    assert max_overlap(client.shard_tis(scenario.dag_id, run_id, SHARD)) <= 2
    scenario.timings["committed_at_kill"] = len(done_before)
    scenario.timings["shards_not_started_at_kill"] = n_pending
    tis = client.shard_tis(scenario.dag_id, run_id, SHARD)
    scenario.timings["tries"] = {t["map_index"]: t["try_number"] for t in tis}
    retried = [t for t in tis if t["try_number"] > 1]
    assert retried, "no shard was running when the scheduler died"
    outcomes = {}
    for ti in retried:
        log = client.log_text(scenario.dag_id, run_id, SHARD, ti["try_number"], ti["map_index"])
        outcomes[ti["map_index"]] = retry_outcome(log)
        if outcomes[ti["map_index"]] != "recomputed":  # reconnected: its rows were computed once
            assert all(after[i] == 1 for i in plan[ti["map_index"]]["ids"])
    scenario.timings["retries"] = outcomes
    # The shard caught mid-way kept computing on Ray while no Airflow process watched it; its
    # retry picked up that work (task_state_store) instead of computing it again.
    for index in mid_shard:
        assert outcomes.get(index, "not retried") in ("reconnected", "already finished"), (index, outcomes)
        assert all(after[i] == 1 for i in plan[index]["ids"])


# -- scenario 1b ------------------------------------------------------------------------------
@pytest.mark.dag("deploy_scheduler_only_kill")
def test_1b_only_the_scheduler_process_killed(deployment: Deployment, client: AirflowClient, scenario):
    """SIGKILL the scheduler process alone (its LocalExecutor workers live on, as after a
    ``kill <pid>``); a new scheduler finishes the run, with no committed shard computed again.

    A hang of 480 s was seen here once (earlier provider code). One way Airflow can hang so:
    the LocalExecutor's workers are forked from the scheduler and keep its Postgres sockets
    open (``airflow.settings`` disposes the pool in the child with ``close=False``), so a
    transaction the scheduler had open when it died, and its row lock on the DAG run, can
    outlive it; the new scheduler's ``SELECT ... FOR UPDATE SKIP LOCKED`` then skips that run.
    The test records any session left idle in a transaction right after the kill, and the
    deployment sets Postgres' ``idle_in_transaction_session_timeout`` (60 s) so that such a
    session cannot hold the run for longer (``ABP_TEST_IDLE_IN_TRANSACTION_TIMEOUT=0`` turns it off).
    """
    kill_only_the_scheduler(deployment, client, scenario)


# -- scenario 2 -------------------------------------------------------------------------------
@pytest.mark.dag("deploy_task_kill")
def test_2_task_process_sigkill_reconnects(deployment: Deployment, client: AirflowClient, scenario):
    """SIGKILL one running shard's task process; its retry reconnects to the Ray work (or recomputes only it)."""
    started = time.monotonic()
    run_id = start_run(client, scenario.dag_id)
    wait_for(lambda: [t for t in client.shard_tis(scenario.dag_id, run_id, SHARD) if t["map_index"] >= 0], 240, what="mapped shard tasks")
    plan = unit_ids(client, scenario.dag_id, run_id)

    def victim():
        """A running shard whose Ray work has computed its first batch (so it is mid-shard)."""
        done = calls(scenario.calls_log)
        for ti in client.shard_tis(scenario.dag_id, run_id, SHARD):
            if ti["state"] == "running" and any(done[i] for i in plan[ti["map_index"]]["ids"]):
                pid = task_pid(ti["id"])
                if pid:
                    return ti, pid
        return None

    ti, pid = wait_for(victim, 240, interval=0.2, what="a running shard mid-compute")
    index = ti["map_index"]
    calls_at_kill = calls(scenario.calls_log)
    os.kill(pid, signal.SIGKILL)
    scenario.timings["killed_task_pid"] = pid
    assert client.wait_run(scenario.dag_id, run_id, timeout=480) == "success"
    scenario.timings["run_s"] = round(time.monotonic() - started, 1)

    tries = client.tries(scenario.dag_id, run_id, SHARD, index)
    assert max(t["try_number"] for t in tries) >= 2, tries
    log = client.log_text(scenario.dag_id, run_id, SHARD, 2, index)
    outcome = retry_outcome(log)
    after = calls(scenario.calls_log)
    twice = sorted(i for i, n in after.items() if n > 1)
    scenario.timings["retry"] = outcome
    if outcome != "recomputed":
        assert not twice, f"reconnected, yet ids computed twice: {twice}"
    else:
        assert set(twice) <= set(plan[index]["ids"]), f"rows of other shards recomputed: {twice}"
        assert any(calls_at_kill[i] for i in plan[index]["ids"])
    for other, unit in plan.items():
        if other != index:
            assert all(after[i] == 1 for i in unit["ids"]), f"shard {other} computed again"
    assert_each_row_once(scenario.sink, scenario.opts["rows"])


# -- scenario 3 -------------------------------------------------------------------------------
@pytest.mark.dag("deploy_clear_failed")
def test_3_clear_failed_map_indexes_like_the_ui(deployment: Deployment, client: AirflowClient, scenario):
    """Two shards fail (no retries); clearing only them (UI style) completes the run; others not recomputed."""
    marker = scenario.base / "FAIL"
    marker.write_text("fail while this file exists")
    started = time.monotonic()
    run_id = start_run(client, scenario.dag_id)
    assert client.wait_run(scenario.dag_id, run_id, timeout=300) == "failed"
    scenario.timings["failed_run_s"] = round(time.monotonic() - started, 1)
    tis = client.shard_tis(scenario.dag_id, run_id, SHARD)
    failed = [t["map_index"] for t in tis if t["state"] == "failed"]
    assert len(failed) == 2, [(t["map_index"], t["state"]) for t in tis]
    assert {t["state"] for t in tis if t["map_index"] not in failed} == {"success"}
    finalize = [t for t in client.task_instances(scenario.dag_id, run_id) if t["task_id"] == FINALIZE][0]
    assert finalize["state"] == "upstream_failed"
    plan = unit_ids(client, scenario.dag_id, run_id)
    calls_before = calls(scenario.calls_log)

    marker.unlink()
    tick = time.monotonic()
    client.clear_failed(scenario.dag_id, run_id, [[SHARD, i] for i in failed])
    assert client.wait_run(scenario.dag_id, run_id, timeout=300) == "success"
    scenario.timings["after_clear_s"] = round(time.monotonic() - tick, 1)

    after = calls(scenario.calls_log)
    for index, unit in plan.items():
        if index not in failed:
            assert all(after[i] == calls_before[i] == 1 for i in unit["ids"]), f"succeeded shard {index} computed again"
    tis = {t["map_index"]: t for t in client.shard_tis(scenario.dag_id, run_id, SHARD)}
    assert all(tis[i]["try_number"] == 1 for i in plan if i not in failed)
    assert all(tis[i]["try_number"] == 2 for i in failed)
    finalize_tries = [(t["try_number"], t["state"]) for t in client.tries(scenario.dag_id, run_id, FINALIZE, -1)]
    ran = [t for t in finalize_tries if t[1] not in ("upstream_failed", "skipped", None)]
    assert ran == [(finalize_tries[-1][0], "success")], finalize_tries  # ran once, after the clear
    assert_each_row_once(scenario.sink, scenario.opts["rows"])


# -- scenario 5 -------------------------------------------------------------------------------
@pytest.mark.dag("deploy_resume_false")
def test_5_resume_false_cleared_run_keeps_its_work_new_run_starts_fresh(deployment: Deployment, client: AirflowClient, scenario):
    """resume=False, two shards fail; clearing the whole DAG run (plan included) keeps what the
    run committed and computes only the failed shards; a new run starts fresh again."""
    marker = scenario.base / "FAIL"
    marker.write_text("fail while this file exists")
    run_id = start_run(client, scenario.dag_id)
    assert client.wait_run(scenario.dag_id, run_id, timeout=300) == "failed"
    plan = unit_ids(client, scenario.dag_id, run_id)
    failed = [t["map_index"] for t in client.shard_tis(scenario.dag_id, run_id, SHARD) if t["state"] == "failed"]
    assert len(failed) == 2
    kept = committed(scenario.sink)
    assert len(kept) == len(plan) - 2

    marker.unlink()
    client.clear_run(scenario.dag_id, run_id)
    assert client.wait_run(scenario.dag_id, run_id, timeout=300) == "success"
    after = calls(scenario.calls_log)
    for index, unit in plan.items():
        if index not in failed:
            assert all(after[i] == 1 for i in unit["ids"]), f"shard {index}, committed before the clear, computed again"
    assert kept <= committed(scenario.sink)
    assert len(unit_ids(client, scenario.dag_id, run_id)) == 2  # the re-run plan mapped only the failed shards
    assert_each_row_once(scenario.sink, scenario.opts["rows"])

    second = start_run(client, scenario.dag_id)
    assert client.wait_run(scenario.dag_id, second, timeout=300) == "success"
    again = calls(scenario.calls_log)
    assert all(again[i] > after[i] for i in range(scenario.opts["rows"]))  # a new run: every row afresh
    assert_each_row_once(scenario.sink, scenario.opts["rows"])


# -- scenario 4 -------------------------------------------------------------------------------
@pytest.mark.dag("deploy_scheduler_kill")
def test_4_second_run_same_spec_is_fast(deployment: Deployment, client: AirflowClient, scenario):
    """A second run of a finished spec maps no shard and finishes fast."""
    if not (scenario.sink / "_SUCCESS").exists():
        pytest.skip("needs test_1's finished job in the same session")
    calls_before = calls(scenario.calls_log)
    started = time.monotonic()
    run_id = client.trigger(scenario.dag_id)
    assert client.wait_run(scenario.dag_id, run_id, timeout=300) == "success"
    elapsed = time.monotonic() - started
    scenario.timings["second_run_s"] = round(elapsed, 1)
    assert client.xcom(scenario.dag_id, run_id, PLAN) == []
    shard_states = {t["state"] for t in client.shard_tis(scenario.dag_id, run_id, SHARD)}
    assert shard_states <= {"skipped"}, shard_states
    assert calls(scenario.calls_log) == calls_before
    assert client.xcom(scenario.dag_id, run_id, FINALIZE)["computed_this_run"] == 0
    assert elapsed < 120


# -- deferrable shards ------------------------------------------------------------------------
@pytest.mark.dag("deploy_deferrable")
def test_deferrable_shards_free_worker_slots(deployment: Deployment, client: AirflowClient, scenario):
    """Deferred shards hold no worker slot: more shards compute at once than the executor has slots."""
    started = time.monotonic()
    run_id = start_run(client, scenario.dag_id)
    peak = {"deferred": 0}

    def watch():
        states = collections.Counter(t["state"] for t in client.shard_tis(scenario.dag_id, run_id, SHARD))
        peak["deferred"] = max(peak["deferred"], states["deferred"])

    assert client.wait_run(scenario.dag_id, run_id, timeout=480, on_poll=watch) == "success"
    scenario.timings["run_s"] = round(time.monotonic() - started, 1)
    scenario.timings["peak_deferred"] = peak["deferred"]
    assert peak["deferred"] > deployment.parallelism, (
        f"at most {peak['deferred']} shards deferred at once with parallelism {deployment.parallelism}"
    )
    tis = client.shard_tis(scenario.dag_id, run_id, SHARD)
    log = client.log_text(scenario.dag_id, run_id, SHARD, tis[0]["try_number"], tis[0]["map_index"])
    assert "Deferring while Ray computes" in log
    outputs = {t["map_index"]: client.xcom(scenario.dag_id, run_id, SHARD, t["map_index"]) for t in tis}
    assert all(out["computed"] == 1 for out in outputs.values()), outputs
    assert max(calls(scenario.calls_log).values()) == 1
    assert_each_row_once(scenario.sink, scenario.opts["rows"])


# -- concurrency cap ----------------------------------------------------------------------------
@pytest.mark.dag("deploy_pool_cap")
def test_pool_caps_concurrent_shards_to_gpus(deployment: Deployment, client: AirflowClient, scenario):
    """A 1-slot pool (one GPU) runs one shard at a time."""
    client.post("/api/v2/pools", {"name": "gpu_slots", "slots": 1, "description": "one per GPU", "include_deferred": True})
    started = time.monotonic()
    run_id = start_run(client, scenario.dag_id)
    assert client.wait_run(scenario.dag_id, run_id, timeout=480) == "success"
    scenario.timings["run_s"] = round(time.monotonic() - started, 1)
    tis = client.shard_tis(scenario.dag_id, run_id, SHARD)
    assert len(tis) == 4 and {t["pool"] for t in tis} == {"gpu_slots"}
    assert max_overlap(tis) == 1
    assert_each_row_once(scenario.sink, scenario.opts["rows"])


# -- a user stops a deferred shard ----------------------------------------------------------------
@pytest.mark.dag("deploy_deferred_mark_failed")
def test_marking_a_deferred_shard_failed_cancels_its_ray_call(deployment: Deployment, client: AirflowClient, scenario):
    """A user marks a deferred shard task failed while Ray computes it (5 batches of 6 s): the
    triggerer calls the trigger's ``on_kill``, which cancels the Ray call, so the replica stops
    between two batches instead of computing the shard to its end, and commits nothing."""
    run_id = start_run(client, scenario.dag_id)

    def deferred_and_computing():
        tis = client.shard_tis(scenario.dag_id, run_id, SHARD)
        return tis[0] if tis and tis[0]["state"] == "deferred" and calls(scenario.calls_log) else None

    ti = wait_for(deferred_and_computing, timeout=240, what="the shard task deferred with its first batch running")
    client.patch(f"/api/v2/dags/{scenario.dag_id}/dagRuns/{run_id}/taskInstances/{SHARD}/{ti['map_index']}", {"new_state": "failed"})
    batches_at_mark = len(scenario.calls_log.read_text().splitlines())
    time.sleep(32)  # the whole call takes 30 s: had it gone on, every batch would be logged by now
    batches = len(scenario.calls_log.read_text().splitlines())
    scenario.timings.update(batches_at_mark=batches_at_mark, batches_computed=batches)
    assert batches <= batches_at_mark + 1 < 5, (batches_at_mark, batches)  # at most the batch running at the cancel ends
    assert committed(scenario.sink) == set()
    assert client.wait_run(scenario.dag_id, run_id, timeout=120) == "failed"


# -- partitioned assets -----------------------------------------------------------------------
def test_a_downstream_dag_runs_once_per_partition_of_a_templated_sink(deployment: Deployment, client: AirflowClient):
    """A templated sink's asset event names the partition its run wrote, and a downstream DAG on
    a ``PartitionedAssetTimetable`` gets one run per partition with that key (see
    ``partition_dags.py``): the rendered ``{{ ds }}`` of two daily runs of a plain DAG, and the
    run's own key for a run of a partitioned DAG (whose sink renders to something else)."""
    started = time.monotonic()
    data = deployment.root / "data" / "partitions"
    write_jsonl(str(data / "in" / "rows.jsonl"), [{"id": i, "value": i} for i in range(20)])
    dag_ids = ("partitions_daily", "partitions_daily_downstream", "partitions_runtime", "partitions_runtime_downstream")
    for dag_id in dag_ids:
        client.wait_dag(dag_id)
        client.unpause(dag_id)
    upstream = [
        ("partitions_daily", client.post("/api/v2/dags/partitions_daily/dagRuns", {"logical_date": f"{day}T00:00:00Z"})["dag_run_id"])
        for day in ("2026-12-05", "2026-12-06")
    ]
    body = {"logical_date": None, "partition_key": "eu", "conf": {"day": "2026-12-07"}}
    upstream.append(("partitions_runtime", client.post("/api/v2/dags/partitions_runtime/dagRuns", body)["dag_run_id"]))
    for dag_id, run_id in upstream:
        assert client.wait_run(dag_id, run_id, timeout=240) == "success"
    upstream_done = time.monotonic()

    def downstream_runs(dag_id: str, count: int):
        runs = client.get(f"/api/v2/dags/{dag_id}/dagRuns")["dag_runs"]
        done = [r for r in runs if r["state"] in ("success", "failed")]
        return runs if len(done) >= count else None

    daily = wait_for(lambda: downstream_runs("partitions_daily_downstream", 2), 120, what="two downstream runs")
    runtime = wait_for(lambda: downstream_runs("partitions_runtime_downstream", 1), 120, what="one downstream run")
    downstream_done = time.monotonic()
    assert sorted((r["partition_key"], r["state"]) for r in daily) == [("2026-12-05", "success"), ("2026-12-06", "success")]
    assert [(r["partition_key"], r["state"]) for r in runtime] == [("eu", "success")]
    # what the downstream task saw: its run's key, and the partition's path on the triggering event
    for day in ("2026-12-05", "2026-12-06"):
        seen = json.loads((data / "seen" / "partitions_daily_downstream" / f"{day}.json").read_text())
        assert seen == {"partition_key": day, "sinks": [str(data / "out" / day)]}
        assert_each_row_once(data / "out" / day, 20)
    seen = json.loads((data / "seen" / "partitions_runtime_downstream" / "eu.json").read_text())
    assert seen == {"partition_key": "eu", "sinks": [str(data / "out_rt" / "2026-12-07")]}
    # one asset per sink, at the sink's untemplated root, whatever the partition
    assets = {a["uri"]: a for a in client.get("/api/v2/assets", uri_pattern=str(data))["assets"]}
    assert set(assets) == {f"file://{data}/out", f"file://{data}/out_rt"}
    events = client.get("/api/v2/assets/events", asset_id=assets[f"file://{data}/out"]["id"])["asset_events"]
    assert sorted(e["partition_key"] for e in events) == ["2026-12-05", "2026-12-06"]
    TIMINGS["partitioned assets"] = {
        "upstream_runs_s": round(upstream_done - started, 1), "downstream_after_upstream_s": round(downstream_done - upstream_done, 1),
        "test_s": round(time.monotonic() - started, 1),
    }
