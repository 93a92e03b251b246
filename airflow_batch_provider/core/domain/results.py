"""What one shard run did: the result a replica hands back, XCom carries, and a sentinel rebuilds."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_batch_provider.core.counters import GPU_SECONDS, summed


@dataclass(frozen=True)
class ShardResult:
    """What one shard run did; JSON-able (``to_dict``), it travels back through Ray and XCom.

    ``worker_pid`` and ``model_load_seconds`` are set by the Ray replica that ran the shard
    (the pid of its Ray worker process; the model's load time on its first shard, else 0).
    ``counters`` are the ones its sentinel records (``core/counters.py``): the predictor's
    and the runner's own (``replica_seconds``, ``model_seconds``, ``gpu_seconds``); for a
    shard found committed, those of the run that committed it."""

    shard_id: str
    status: str  # "computed" | "skipped" (already committed) | "lost_race" (another attempt won)
    rows_in: int = 0
    rows_out: int = 0
    bytes: int = 0
    rows_rejected: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    note: str = ""
    worker_pid: int | None = None
    model_load_seconds: float = 0.0
    counters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def skipped(cls, shard_id: str, sentinel: dict[str, Any] | None, seconds: float = 0.0, note: str = "") -> ShardResult:
        """A shard found committed: its counts come from its sentinel."""
        sentinel = sentinel or {}
        return cls(
            shard_id, "skipped", sentinel.get("rows_in", 0), sentinel.get("rows_out", 0), sentinel.get("bytes", 0),
            sentinel.get("rows_rejected", 0), seconds, note=note, counters=dict(sentinel.get("counters") or {}),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardResult:
        """Read back :meth:`to_dict` (keys it does not know are ignored: a newer replica may add some)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def computed(self) -> bool:
        return self.status == "computed"

    @property
    def rows_per_second(self) -> float:
        return self.rows_in / self.seconds if self.seconds else 0.0

    @property
    def gpu_seconds(self) -> float:
        return float(self.counters.get(GPU_SECONDS, 0))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarise(results: list[ShardResult], task_seconds: float | None = None) -> dict[str, Any]:
    """One work unit's figures (its task's return value): the shards, how many were computed
    (not found committed), their rows and seconds, their counters summed (those of shards
    found committed too, as their rows); ``task_seconds`` is the task's wall time."""
    return {
        "task_seconds": task_seconds,
        "shards": [r.shard_id for r in results],
        "computed": sum(r.computed for r in results),
        "rows_in": sum(r.rows_in for r in results),
        "rows_out": sum(r.rows_out for r in results),
        "rows_rejected": sum(r.rows_rejected for r in results),
        "seconds": sum(r.seconds for r in results),
        "model_seconds": sum(r.model_seconds for r in results),
        "counters": summed(r.counters for r in results),
    }
