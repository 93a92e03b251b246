"""The operators and the trigger log their progress and results as structured events
(``core/events.py``), beside the lines in words, and the events read back from the log."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from airflow_batch_provider.core import api
from airflow_batch_provider.core.events import EventKind, parse_events
from airflow_batch_provider.operators import batch as batch_mod
from airflow_batch_provider.operators.batch import BatchShardOperator, FinalizeBatchOperator, PlanBatchOperator
from airflow_batch_provider.triggers.shard import RayShardTrigger
from tests.helpers import FakeTI

RESULTS = [
    {"shard_id": "s0", "status": "computed", "rows_in": 4, "rows_out": 3, "rows_rejected": 1, "bytes": 10, "seconds": 1.0,
     "model_seconds": 0.5, "model_load_seconds": 2.5, "worker_pid": 7},
    {"shard_id": "s1", "status": "skipped", "rows_in": 6, "rows_out": 6, "bytes": 12, "seconds": 0.1, "model_seconds": 0.0},
]


@pytest.fixture
def logged(capsys, caplog):
    """What the task loggers wrote (structlog prints to stdout here; the trigger's stdlib logger
    reaches caplog)."""
    caplog.set_level(logging.INFO)
    return lambda: capsys.readouterr().out + caplog.text


def spec_dict(source: str, sink: str) -> dict[str, Any]:
    return {"source": source, "source_format": "jsonl", "sink": sink, "predictor": "tests.predictors:Doubler", "rows_per_shard": 100}


def test_plan_and_finalize_log_their_summaries(monkeypatch, jsonl_source, tmp_path, logged):
    spec = spec_dict(jsonl_source, str(tmp_path / "out"))
    ti = FakeTI()
    units = PlanBatchOperator(task_id="plan", spec=spec, start_replicas=0).execute({"ti": ti})
    (plan,) = parse_events(logged(), EventKind.PLAN)
    assert plan == {"event": "plan", "sink": str(tmp_path / "out"), "shards": 5, "rows": 380, "committed": 0, "pending": 5,
                    "tasks": len(units), "plan_written": True}

    core = api.JobSpec.from_dict(spec)
    runner = api.ShardRunner(core)
    for shard in api.plan(core).pending:
        runner.run(shard, api.new_attempt())
    result = FinalizeBatchOperator(task_id="finalize", spec=spec, plan_task_id="plan", release_replicas=False).execute(
        {"ti": ti, "outlet_events": {}}
    )
    (event,) = parse_events(logged(), EventKind.RESULT)
    assert event == {"event": "result", **result}
    assert event["rows_out"] == 380 and event["computed_this_run"] == 5 and "storage_options" not in event


def test_a_shard_task_logs_each_shard_and_its_overhead(logged):
    task = BatchShardOperator(task_id="shard", spec={"source": "/in/*.jsonl", "sink": "/out", "predictor": "m:C"},
                              work_unit={"label": "2 shards: s0 .. s1", "shards": []})
    summary = task._summarise([api.ShardResult.from_dict(r) for r in RESULTS], task_seconds=2.0)
    text = logged()
    assert "Shard s0 computed: 4 rows in" in text  # the line in words stays
    done = parse_events(text, EventKind.SHARD_DONE)
    assert [(e["shard_id"], e["status"], e["rows_in"], e["rows_rejected"], e["model_load_seconds"]) for e in done] == [
        ("s0", "computed", 4, 1, 2.5), ("s1", "skipped", 6, 0, 0.0)]
    assert parse_events(text, EventKind.SHARD_TASK) == [
        {"event": "shard_task", "task_seconds": 2.0, "model_seconds": 0.5, "overhead_seconds": 1.5}]
    assert summary["rows_in"] == 10

    task._summarise([api.ShardResult.from_dict(RESULTS[0])])  # deferred: no wall time of its own to report
    assert parse_events(logged(), EventKind.SHARD_TASK) == []


def test_a_shard_task_logs_its_progress(logged):
    task = BatchShardOperator(task_id="shard", spec={"source": "/in/*.jsonl", "sink": "/out", "predictor": "m:C"},
                              work_unit={"label": "s0 a.jsonl lines 0-100", "shards": []})
    task._log_progress(api.Progress(rows_done=40, rows_total=100, seconds=2.0))
    assert parse_events(logged(), EventKind.PROGRESS) == [
        {"event": "progress", "label": "s0 a.jsonl lines 0-100", "rows_done": 40, "rows_total": 100, "seconds": 2.0}]


def test_a_deferred_shard_logs_its_progress_from_the_trigger(monkeypatch, logged):
    trigger = RayShardTrigger(worker="w", token="t", spec={"source": "/in/*.jsonl", "sink": "/out", "predictor": "m:C"},
                              shards=[], label="s0 a.jsonl lines 0-100", poll_interval=0, progress_interval=0)
    outcomes = iter([{"state": "RUNNING", "progress": {"rows_done": 40, "rows_total": 100, "seconds": 2.0}},
                     {"state": "SUCCEEDED", "results": []}])

    class Follower:
        def status(self, work):
            return next(outcomes)

    async def connect():
        return api.ShardCall(Follower(), [], unit="", label=trigger.label)

    monkeypatch.setattr(trigger, "_connect", connect)

    async def first():
        async for event in trigger.run():
            return event.payload

    assert asyncio.run(first())["status"] == "success"
    assert parse_events(logged(), EventKind.PROGRESS) == [
        {"event": "progress", "label": "s0 a.jsonl lines 0-100", "rows_done": 40, "rows_total": 100, "seconds": 2.0}]


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    monkeypatch.setattr(batch_mod.RayHook, "get_conn", lambda self: None)
