"""The provider's structured events: its progress and results as data in the task log.

The operators log each fact twice: once in words for the people who read the log, once as an
event for the programs that read it (the demo, the benchmarks, the integration tests, a user's
own tooling). Wording changes; an event's kind and fields are a contract, kept here.

Wire format: one event per log line, the :data:`MARKER` and then one JSON object whose
``"event"`` key names the kind, such as::

    batch_event {"event": "shard_done", "shard_id": "3f2a...", "status": "computed", ...}

A host logs the line as the whole message of one record (``log.info("%s", format_event(...))``).
Whatever the log formatter prints around the message (Airflow's timestamp and level before
it, the logger's name after it) is skipped by :func:`parse_events`. Events hold values only
(counts, seconds, ids, labels, the sink's path), never storage options or other secrets.

The marker is reserved: what follows it must be one JSON object with an ``"event"`` key.
Anything else there is an :class:`EventParseError`, not skipped: it is a truncated or
corrupted event, and a reader summing rows over events would silently count too few.
Objects of a kind this version does not know are returned as they are (a newer provider may
add kinds); the fields listed in :data:`FIELDS` are always present in events of that kind.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Any

#: what starts every event in a log line; followed by one JSON object
MARKER = "batch_event "


class EventKind(str, Enum):
    """The kinds of event the provider logs, and where."""

    #: the plan task: shards planned, how many were committed already, how many to compute
    PLAN = "plan"
    #: a shard task, once per shard of its work unit: what the shard's run did
    SHARD_DONE = "shard_done"
    #: a shard task (not deferred): its wall time and the part of it not spent in the model
    SHARD_TASK = "shard_task"
    #: a shard task or its trigger, while Ray computes: rows done so far of the work unit
    PROGRESS = "progress"
    #: the finalize task: the job's totals, as in ``_SUCCESS``
    RESULT = "result"


#: the fields every event of a kind has (an event may carry more)
FIELDS: dict[EventKind, tuple[str, ...]] = {
    EventKind.PLAN: ("sink", "shards", "rows", "committed", "pending", "tasks"),
    EventKind.SHARD_DONE: (
        "shard_id", "status", "rows_in", "rows_out", "rows_rejected", "bytes", "seconds", "model_seconds", "model_load_seconds",
        "counters",
    ),
    EventKind.SHARD_TASK: ("task_seconds", "model_seconds", "overhead_seconds"),
    EventKind.PROGRESS: ("label", "rows_done", "rows_total", "seconds"),
    EventKind.RESULT: (
        "sink", "shards", "rows_in", "rows_out", "rows_rejected", "bytes", "computed_this_run", "elapsed_seconds", "counters",
    ),
}

# The marker as a word of its own: "my_batch_event {" in some other text is not an event.
_MARKER_AT = re.compile(r"(?<![\w.-])" + re.escape(MARKER))
_DECODER = json.JSONDecoder()


class EventParseError(ValueError):
    """Text after the marker is not one JSON object naming its kind."""


def format_event(kind: EventKind | str, **fields: Any) -> str:
    """The log line of one event: the marker and a one-line JSON object, ``"event"`` first.

    Raises ``ValueError`` for an unknown kind or a missing field, so that a change to an
    emitting spot cannot quietly break the readers."""
    kind = EventKind(kind)
    if "event" in fields:
        raise ValueError("'event' is the key of the event's kind, not a field")
    missing = [name for name in FIELDS[kind] if name not in fields]
    if missing:
        raise ValueError(f"{kind.value} event without {', '.join(missing)}")
    return MARKER + json.dumps({"event": kind.value, **fields})


def parse_events(text: str, kind: EventKind | str | None = None) -> list[dict[str, Any]]:
    """Every event in ``text`` (a task log, the output of ``airflow dags test``), in order;
    with ``kind``, only those of that kind. Each is the event's JSON object (``"event"``:
    its kind). Raises :class:`EventParseError` where the marker is not followed by one."""
    wanted = None if kind is None else EventKind(kind).value
    found = []
    position = 0
    while match := _MARKER_AT.search(text, position):
        start = match.end()
        try:
            event, position = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError as err:
            raise EventParseError(f"no JSON event after {MARKER.strip()!r} at offset {match.start()}: "
                                  f"{_line_at(text, match.start())!r} ({err.msg})") from None
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            raise EventParseError(f"{MARKER.strip()!r} at offset {match.start()} is not followed by an object with an "
                                  f"'event' key: {_line_at(text, match.start())!r}")
        if wanted is None or event["event"] == wanted:
            found.append(event)
    return found


def _line_at(text: str, offset: int, limit: int = 200) -> str:
    end = text.find("\n", offset)
    return text[offset : end if end >= 0 else len(text)][:limit]
