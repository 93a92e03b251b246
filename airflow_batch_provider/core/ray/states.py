"""The states a shard call on a model replica reports (``Replica.status`` / ``wait``)."""

from __future__ import annotations

from enum import Enum


class RunState(str, Enum):
    """A str, so that it compares equal to (and serialises as) its name in JSON and XCom."""

    RUNNING = "RUNNING"  # running, or leased to the caller and about to run ("queued")
    SUCCEEDED = "SUCCEEDED"  # finished; the outcome carries the shard results
    FAILED = "FAILED"  # raised; the outcome carries the error
    UNKNOWN = "UNKNOWN"  # the replica never ran it, or forgot it (restarted, or too long ago)
    LOST = "LOST"  # the replica is gone

    def __str__(self) -> str:
        return self.value
