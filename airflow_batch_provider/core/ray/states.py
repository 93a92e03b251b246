"""The states a shard call on a model replica reports (``Replica.status`` / ``wait``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class RunState(str, Enum):
    """A str, so that it compares equal to (and serialises as) its name in JSON and XCom."""

    RUNNING = "RUNNING"  # running, or leased to the caller and about to run ("queued")
    SUCCEEDED = "SUCCEEDED"  # finished; the outcome carries the shard results
    FAILED = "FAILED"  # raised; the outcome carries the error
    UNKNOWN = "UNKNOWN"  # the replica never ran it, or forgot it (restarted, or too long ago)
    LOST = "LOST"  # the replica is gone

    def __str__(self) -> str:
        return self.value


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

    def describe(self) -> str:
        """``12,000 of 50,000 rows (24%), 410 rows/s, about 93 s left``."""
        share = self.rows_done / self.rows_total if self.rows_total else 0.0
        rate = self.rows_per_second
        left = f"about {(self.rows_total - self.rows_done) / rate:.0f} s left" if rate and self.rows_total > self.rows_done else "finishing"
        return f"{self.rows_done:,} of {self.rows_total:,} rows ({share:.0%}), {rate:,.0f} rows/s, {left}"
