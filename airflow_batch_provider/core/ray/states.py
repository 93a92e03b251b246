"""The typed words of a shard's Ray call: its work id, the states it reports, its outcome,
and the event a trigger ends with. Plain data, no Ray: the operator, the trigger and the
replica's client all speak these, and each has one JSON form (``to_dict``/``from_dict``)
for what crosses a process (Ray, XCom, ``task_state_store``, a trigger's kwargs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from airflow_batch_provider.core.domain.results import ShardResult
from airflow_batch_provider.core.events import EventKind, format_event


class RunState(str, Enum):
    """A str, so that it compares equal to (and serialises as) its name in JSON and XCom."""

    RUNNING = "RUNNING"  # running, or leased to the caller and about to run ("queued")
    SUCCEEDED = "SUCCEEDED"  # finished; the outcome carries the shard results
    FAILED = "FAILED"  # raised; the outcome carries the error
    UNKNOWN = "UNKNOWN"  # the replica never ran it, or forgot it (restarted, or too long ago)
    LOST = "LOST"  # the replica is gone
    KILLED = "KILLED"  # cancel only: the call did not stop in time and its replica was killed

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class WorkId:
    """Names one Ray call: the replica that runs it, the attempt token it was submitted with,
    and the work unit (its shards) it computes.

    Its JSON form keeps the key ``worker`` for the replica: ids stored in ``task_state_store``
    by earlier releases must still be read by a retry."""

    replica: str
    token: str
    unit: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkId:
        return cls(replica=data.get("worker") or data.get("replica") or "", token=data["token"], unit=data.get("unit") or "")

    def to_dict(self) -> dict[str, str]:
        """The pool's wire form (``{"worker", "token"}``), with ``unit`` when known."""
        data = {"worker": self.replica, "token": self.token}
        if self.unit:
            data["unit"] = self.unit
        return data

    def __str__(self) -> str:
        return f"{self.token} on {self.replica}"


@dataclass(frozen=True)
class Progress:
    """How far a running call is: rows done of the rows planned for its shards, since when."""

    rows_done: int
    rows_total: int
    seconds: float

    @classmethod
    def of(cls, outcome: dict[str, Any]) -> Progress | None:
        """The progress in a RUNNING ``status``/``wait`` answer (None before the first batch)."""
        data = outcome.get("progress")
        if not data or outcome.get("state") != RunState.RUNNING:
            return None
        return cls(int(data["rows_done"]), int(data["rows_total"]), float(data["seconds"]))

    @property
    def rows_per_second(self) -> float:
        return self.rows_done / self.seconds if self.seconds > 0 else 0.0

    def event(self, label: str) -> str:
        """The structured event of this progress for the log of the work unit ``label``."""
        return format_event(EventKind.PROGRESS, label=label, rows_done=self.rows_done, rows_total=self.rows_total, seconds=self.seconds)

    def describe(self) -> str:
        """``12,000 of 50,000 rows (24%), 410 rows/s, about 93 s left``."""
        share = self.rows_done / self.rows_total if self.rows_total else 0.0
        rate = self.rows_per_second
        left = f"about {(self.rows_total - self.rows_done) / rate:.0f} s left" if rate and self.rows_total > self.rows_done else "finishing"
        return f"{self.rows_done:,} of {self.rows_total:,} rows ({share:.0%}), {rate:,.0f} rows/s, {left}"


@dataclass(frozen=True)
class CallOutcome:
    """A replica's answer about one call (``Replica.status``/``wait``), typed.

    ``queued``: RUNNING, but only leased to the call, which the replica has not taken up yet."""

    state: RunState
    results: list[ShardResult] = field(default_factory=list)
    error: str = ""
    retryable: bool = True
    progress: Progress | None = None
    queued: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CallOutcome:
        state = RunState(str(data.get("state") or RunState.UNKNOWN))
        return cls(
            state=state,
            results=[ShardResult.from_dict(r) for r in data.get("results") or []],
            error=str(data.get("error") or ""),
            retryable=bool(data.get("retryable", True)),
            progress=Progress.of(data),
            queued=bool(data.get("queued")),
        )

    @property
    def started(self) -> bool:
        """The replica runs the call, or has ended it: more than holding its lease."""
        return self.state != RunState.UNKNOWN and not (self.state == RunState.RUNNING and self.queued)

    @property
    def ended(self) -> bool:
        """Not running (nor leased) any more: succeeded, failed, or gone."""
        return self.state != RunState.RUNNING


class CallEnd(str, Enum):
    """How a trigger's wait for a call ended (the ``status`` of its event)."""

    SUCCESS = "success"  # every shard computed or found committed: the event carries the results
    LOST = "lost"  # the call went with its replica or node and not every shard is committed
    ERROR = "error"  # it failed (or polling it failed): the event carries the message

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class CallEvent:
    """The one event a trigger yields for a call; ``execute_complete`` reads it back.

    ``resubmits``: how often this task try already submitted the work again after losing it
    (so that ``max_retries`` counts across deferrals)."""

    status: CallEnd
    work: WorkId
    results: list[ShardResult] = field(default_factory=list)
    message: str = ""
    retryable: bool = True
    resubmits: int = 0

    @classmethod
    def from_dict(cls, data: Any) -> CallEvent:
        """Raises ``ValueError`` for anything that is not such an event."""
        if not isinstance(data, dict) or "status" not in data:
            raise ValueError(f"not a shard call event: {data!r}")
        status = CallEnd(data["status"])
        if status == CallEnd.SUCCESS and not isinstance(data.get("results"), list):
            raise ValueError(f"success event without results ({data!r})")
        return cls(
            status=status,
            work=WorkId(replica=data.get("worker") or "", token=data.get("token") or ""),
            results=[ShardResult.from_dict(r) for r in data.get("results") or []],
            message=str(data.get("message") or ""),
            retryable=bool(data.get("retryable", True)),
            resubmits=int(data.get("resubmits") or 0),
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"status": str(self.status), "worker": self.work.replica, "token": self.work.token}
        if self.status == CallEnd.SUCCESS:
            data["results"] = [r.to_dict() for r in self.results]
        if self.message:
            data["message"] = self.message
        if self.status == CallEnd.ERROR:
            data["retryable"] = self.retryable
        if self.status == CallEnd.LOST:
            data["resubmits"] = self.resubmits
        return data
