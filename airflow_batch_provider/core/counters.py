"""Counters a predictor reports (tokens, requests, ...), tallied per shard: the predictor side.

A predictor calls :func:`add` from its ``__call__``::

    from airflow_batch_provider.counters import add

    def __call__(self, batch):
        ...
        add("tokens_out", generated)

The runner opens a :class:`Tally` for each shard it writes (:func:`collecting`) and the
predictor's calls land in it; the totals travel back with the shard's result (through Ray's
return value, never through state a replica shares) into its sentinel, ``_SUCCESS``, the
status page, the CLI and the events. The tally is found through a context variable, so two
shards run side by side in one process (tests, a host's threads) never mix their counts,
and a predictor called outside a shard (a notebook, Ray Data's ``map_batches``) counts into
nothing. A thread the predictor starts itself does not see the shard's tally: count there and
add the sum in ``__call__``'s thread, or run the thread's work in a copy of the caller's
context (``contextvars.copy_context().run``).

The runner's own figures (``docs/counting.md``) are kept in the same record, so their names
are reserved: a predictor that uses one, or adds a value that is not a finite number, fails
its shard with :class:`~airflow_batch_provider.core.errors.PredictorOutputError` (raised by
the runner after the call, so that ``bad_rows="skip"`` does not reject rows for it).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

#: the figures the runner measures itself, kept beside the predictor's counters
REPLICA_SECONDS = "replica_seconds"
MODEL_SECONDS = "model_seconds"
GPU_SECONDS = "gpu_seconds"
RESERVED = frozenset({REPLICA_SECONDS, MODEL_SECONDS, GPU_SECONDS, "rows_in", "rows_out", "rows_rejected", "bytes", "cost"})

_current: ContextVar[Tally | None] = ContextVar("airflow_batch_provider_counters", default=None)


class Tally:
    """One shard's counters: ``{name: total}``. Thread-safe (a predictor may add from the
    threads it runs in a copy of the caller's context)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, int | float] = {}
        #: the first misuse seen (a reserved name, a value that is not a number): the runner raises it
        self.problem: str | None = None

    def add(self, name: str, value: int | float) -> None:
        with self._lock:
            self._totals[name] = self._totals.get(name, 0) + value

    def totals(self) -> dict[str, int | float]:
        with self._lock:
            return dict(sorted(self._totals.items()))


def add(name: str, value: int | float = 1) -> None:
    """Add ``value`` to the counter ``name`` of the shard being computed (a no-op outside one).

    ``name``: a short identifier of your own (``tokens_in``, ``requests``, ``images``), not
    one of the runner's (:data:`RESERVED`). ``value``: an int or a finite float, usually > 0.
    Outside a shard a misuse raises ``ValueError`` at once; inside one the runner fails the
    shard naming it, after the call."""
    problem = _misuse(name, value)
    tally = _current.get()
    if tally is None:
        if problem:
            raise ValueError(problem)
        return
    if problem:
        tally.problem = tally.problem or problem
        return
    tally.add(name, value)


def _misuse(name: Any, value: Any) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        return f"counters.add: the counter's name must be an identifier such as 'tokens_in', got {name!r}"
    if name in RESERVED:
        return f"counters.add({name!r}, ...): {name!r} is one of the runner's own figures; name the counter otherwise"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"counters.add({name!r}, {value!r}): the value must be an int or a finite float"
    return ""


@contextmanager
def collecting() -> Iterator[Tally]:
    """The runner's side: the counters added in this context, until it ends, go to the tally."""
    tally = Tally()
    token = _current.set(tally)
    try:
        yield tally
    finally:
        _current.reset(token)


def summed(records: Iterable[Mapping[str, Any] | None]) -> dict[str, int | float]:
    """Counters added up, name by name (a record without some, or without any, adds nothing
    for them: sentinels written before counters existed read as zeros)."""
    total: dict[str, int | float] = {}
    for record in records:
        for name, value in (record or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total[name] = total.get(name, 0) + value
    return dict(sorted(total.items()))


def cost(counters: Mapping[str, Any], gpu_hour_price: float | None) -> float | None:
    """What the GPU time cost: ``gpu_seconds / 3600 * gpu_hour_price`` (None without a price)."""
    if gpu_hour_price is None:
        return None
    return float(counters.get(GPU_SECONDS, 0)) / 3600 * gpu_hour_price
