"""The wire format of the provider's structured events: written by format_event, read back by parse_events."""

from __future__ import annotations

import logging

import pytest

from airflow_batch_provider.core.events import FIELDS, MARKER, EventKind, EventParseError, format_event, parse_events

SHARD_DONE = {
    "shard_id": "3f2a9c", "status": "computed", "rows_in": 100, "rows_out": 98, "rows_rejected": 2, "bytes": 4096,
    "seconds": 1.25, "model_seconds": 0.75, "model_load_seconds": 3.5,
    "counters": {"gpu_seconds": 1.25, "model_seconds": 0.75, "replica_seconds": 1.25, "tokens_out": 96},
}


def test_every_kind_round_trips():
    for kind, names in FIELDS.items():
        fields = {name: f"value of {name}" for name in names}
        line = format_event(kind, **fields)
        assert line.startswith(MARKER) and "\n" not in line
        assert parse_events(line) == [{"event": kind.value, **fields}]


def test_values_keep_their_types():
    (event,) = parse_events(format_event(EventKind.SHARD_DONE, **SHARD_DONE, worker_pid=None))
    assert event == {"event": "shard_done", **SHARD_DONE, "worker_pid": None}


def test_events_are_found_in_airflow_log_lines_among_other_text():
    """As ``airflow dags test`` prints task logs: a timestamp and level before the message, the
    logger's name after it, the human line beside the event."""
    progress = format_event(EventKind.PROGRESS, label="3f2a9c a.jsonl lines 0-100", rows_done=50, rows_total=100, seconds=2.0)
    text = "\n".join([
        "[2026-01-01T00:00:00.000+0000] {taskinstance.py:1} INFO - Dependencies all met",
        "2026-01-01T00:00:01.000000Z [info     ] Shard 3f2a9c computed: 100 rows in, 98 rows out [airflow.task.operators]",
        f"2026-01-01T00:00:01.000000Z [info     ] {format_event(EventKind.SHARD_DONE, **SHARD_DONE)} [airflow.task.operators] loc=batch.py:1",
        f"[2026-01-01T00:00:02.000+0000] {{shard.py:9}} INFO - {progress}",
        "DagRun Finished: dag_id=abp, state=success",
    ])
    assert [e["event"] for e in parse_events(text)] == ["shard_done", "progress"]
    assert parse_events(text, EventKind.PROGRESS)[0]["rows_done"] == 50
    assert parse_events(text, "shard_done")[0]["rows_rejected"] == 2
    assert parse_events(text, EventKind.PLAN) == []


def test_a_label_holding_the_marker_is_read_once():
    line = format_event(EventKind.PROGRESS, label=f"{MARKER}{{\"event\": \"plan\"}}", rows_done=1, rows_total=2, seconds=0.5)
    assert [e["event"] for e in parse_events(line)] == ["progress"]


def test_the_marker_inside_another_word_is_not_an_event():
    assert parse_events('my_batch_event {"event": "plan"} and prebatch_event x') == []


def test_an_unknown_kind_is_returned_as_it_is():
    assert parse_events(MARKER + '{"event": "newer_kind", "x": 1}') == [{"event": "newer_kind", "x": 1}]


@pytest.mark.parametrize(
    "text",
    [
        "INFO - batch_event shard 3 done",  # prose after the marker
        'INFO - batch_event {"event": "shard_done", "rows_in": 10',  # cut short (a killed process)
        "INFO - batch_event [1, 2]",  # JSON, but not an object
        'INFO - batch_event {"rows_in": 10}',  # an object without its kind
    ],
)
def test_anything_but_an_event_after_the_marker_is_an_error(text):
    """The marker is reserved: skipping a broken event would make a reader's totals wrong."""
    with pytest.raises(EventParseError, match="batch_event"):
        parse_events("first line\n" + text + "\nlast line")


def test_format_refuses_unknown_kinds_and_missing_fields():
    with pytest.raises(ValueError):
        format_event("shard_started", shard_id="x")
    with pytest.raises(ValueError, match="shard_task event without overhead_seconds"):
        format_event(EventKind.SHARD_TASK, task_seconds=2.0, model_seconds=1.0)
    with pytest.raises(ValueError, match="'event' is the key"):
        format_event(EventKind.SHARD_TASK, task_seconds=2.0, model_seconds=1.0, overhead_seconds=1.0, event="x")


def test_an_event_logged_through_logging_reads_back(caplog):
    log = logging.getLogger("abp.test_events")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("%s", format_event(EventKind.SHARD_TASK, task_seconds=2.0, model_seconds=1.5, overhead_seconds=0.5))
    assert parse_events(caplog.text) == [{"event": "shard_task", "task_seconds": 2.0, "model_seconds": 1.5, "overhead_seconds": 0.5}]
