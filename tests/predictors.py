"""Predictors used by the tests. They run on Ray workers, so they live in an importable module.

Every predictor appends a line per call to ``calls_log`` (when given), so tests can count
which rows were computed, across processes and runs.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np


class _Logged:
    def __init__(self, calls_log: str | None = None, fail_marker: str | None = None, fail_mod: int = 0):
        self.calls_log = calls_log
        self.fail_marker = fail_marker
        self.fail_mod = fail_mod

    def log(self, ids: Any) -> None:
        if self.calls_log:
            with open(self.calls_log, "a") as handle:
                handle.write(json.dumps([int(i) for i in ids]) + "\n")

    def maybe_fail(self, ids: Any) -> None:
        """Fail on batches holding an id divisible by ``fail_mod`` while the marker file exists."""
        if self.fail_marker and os.path.exists(self.fail_marker):
            bad = [int(i) for i in ids if self.fail_mod and int(i) % self.fail_mod == 0]
            if bad:
                raise RuntimeError(f"injected failure for ids {bad[:3]}")


class Doubler(_Logged):
    """``value * 2`` per row; keeps ``id``."""

    def __init__(self, factor: int = 2, **kwargs: Any):
        super().__init__(**kwargs)
        self.factor = factor

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.log(batch["id"])
        self.maybe_fail(batch["id"])
        return {"id": batch["id"], "value": batch["value"] * self.factor}


class EvenFilter(_Logged):
    """Keeps rows with an even id (a filtering predictor: fewer rows out than in)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.log(batch["id"])
        keep = batch["id"] % 2 == 0
        return {"id": batch["id"][keep], "value": batch["value"][keep]}


class PandasUpper(_Logged):
    def __call__(self, df):
        self.log(df["id"])
        out = df[["id"]].copy()
        out["text"] = df["text"].str.upper()
        return out


class ArrowPassthrough(_Logged):
    def __call__(self, table):
        self.log(table.column("id").to_pylist())
        return table


class Embedder(_Logged):
    """A 2-D output column (like an embedding model): becomes a fixed-size list column."""

    def __call__(self, batch):
        self.log(batch["id"])
        ids = batch["id"].astype(np.float32)
        return {"id": batch["id"], "embedding": np.stack([ids, ids + 1, ids + 2], axis=1)}


class SlowDoubler(Doubler):
    """``Doubler`` that sleeps ``sleep_s`` per batch, so a shard takes seconds (deployment tests).
    With ``entered_log``, appends a line to it as each batch starts (a test can wait until the
    predictor is inside a batch, not only until the call started)."""

    def __init__(self, sleep_s: float = 1.0, entered_log: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.sleep_s = sleep_s
        self.entered_log = entered_log

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        if self.entered_log:
            with open(self.entered_log, "a") as handle:
                handle.write("batch\n")
        time.sleep(self.sleep_s)
        return super().__call__(batch)


class SlowLoad(Doubler):
    """``Doubler`` whose model takes ``load_s`` to load; appends its pid to ``loads_log`` once loaded."""

    def __init__(self, load_s: float = 2.0, loads_log: str | None = None, **kwargs: Any):
        import time

        super().__init__(**kwargs)
        time.sleep(load_s)
        if loads_log:
            with open(loads_log, "a") as handle:
                handle.write(f"{os.getpid()}\n")


class KeyedDoubler(Doubler):
    """A ``Doubler`` that needs an API key, as a hosted model would; checks it by its digest
    (so the test can tell it arrived) and never writes or returns it."""

    def __init__(self, api_key: str, expected_sha256: str, **kwargs: Any):
        import hashlib

        if hashlib.sha256(api_key.encode()).hexdigest() != expected_sha256:
            raise ValueError("KeyedDoubler: wrong api_key")
        super().__init__(**kwargs)


class LeakyKeyed(Doubler):
    """A hosted model's client that fails the way HTTP clients do: quoting the URL it called,
    API key and all, for batches holding an id divisible by ``fail_mod`` (or at load, with
    ``fail_on_load``)."""

    def __init__(self, api_key: str, fail_mod: int = 97, fail_on_load: bool = False, **kwargs: Any):
        if fail_on_load:
            raise ConnectionError(f"cannot reach https://models.example/v1/load?key={api_key}")
        super().__init__(**kwargs)
        self.api_key = api_key
        self.bad_mod = fail_mod

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bad = [int(i) for i in batch["id"] if int(i) % self.bad_mod == 0]
        if bad:
            raise RuntimeError(f"403 Client Error: Forbidden for url: https://models.example/v1/embed?key={self.api_key}&id={bad[0]}")
        return super().__call__(batch)


class RaiseOnIds(_Logged):
    """``Doubler`` that raises on any batch holding one of ``bad_ids`` (as a model may on a
    row it cannot take): under bad_rows="skip" the runner isolates those rows."""

    def __init__(self, bad_ids: list[int], **kwargs: Any):
        super().__init__(**kwargs)
        self.bad_ids = set(bad_ids)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.log(batch["id"])
        hit = sorted(self.bad_ids & {int(i) for i in batch["id"]})
        if hit:
            raise ValueError(f"cannot embed row id {hit[0]}")
        return {"id": batch["id"], "value": batch["value"] * 2}


class RaggedTokens(_Logged):
    """Returns a list per row whose length depends on the row (token ids): a ragged column."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        self.log(batch["id"])
        return {"id": batch["id"], "tokens": [list(range(int(i) % 3 + 1)) for i in batch["id"]]}


class MistypedOutput(_Logged):
    """Returns a column mixing numbers and strings: it cannot become one Arrow type."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        self.log(batch["id"])
        return {"id": batch["id"], "label": [1 if int(i) % 2 else "one" for i in batch["id"]]}


class RewritesSource(Doubler):
    """``Doubler`` that rewrites ``path`` (same size, new content) on its first call: the
    input changes while its shard is being read."""

    def __init__(self, path: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.path = path
        self.done = False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.done:
            self.done = True
            with open(self.path, "r+b") as handle:
                data = handle.read()
                handle.seek(0)
                handle.write(data.replace(b'"text 1"', b'"TEXT 1"'))
            stat = os.stat(self.path)
            os.utime(self.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        return super().__call__(batch)


class Identity:
    """Returns the batch it is given, in any batch format: what goes in must come out unchanged."""

    def __call__(self, batch):
        return batch


class DriftingOutput:
    """``out`` is an integer for ids below ``threshold`` and a float from there on, so shards
    of low ids return int64 and shards of high ids float64 (output type drift across shards)."""

    def __init__(self, threshold: int = 100):
        self.threshold = threshold

    def __call__(self, batch):
        ids = batch["id"]
        out = ids.copy() if (ids < self.threshold).all() else ids + 0.5
        return {"id": ids, "out": out}


class NodeTracedDoubler(SlowDoubler):
    """``SlowDoubler`` that appends ``{"pid", "ids"}`` per batch to ``trace_log`` *before* it
    sleeps: a test sees which process (so which Ray node) started a batch, and kills it mid-batch.
    With ``load_log``, each replica appends ``{"pid", "ancestors", "loaded_at"}`` there once its
    model is loaded: a test sees on which node Ray started a replica again after its node was
    lost, even once that replica is gone."""

    def __init__(self, trace_log: str, load_log: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.trace_log = trace_log
        if load_log:
            with open(load_log, "a") as handle:
                import psutil

                ancestors = [proc.pid for proc in psutil.Process().parents()]
                handle.write(json.dumps({"pid": os.getpid(), "ancestors": ancestors, "loaded_at": time.time()}) + "\n")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with open(self.trace_log, "a") as handle:
            handle.write(json.dumps({"pid": os.getpid(), "ids": [int(i) for i in batch["id"]]}) + "\n")
        return super().__call__(batch)


class ReusedBufferEmbedder:
    """Returns its embeddings in one preallocated buffer, overwritten at every call (as a
    predictor copying GPU output into a pinned host buffer does): row ``i`` embeds as ``[i, i]``."""

    def __init__(self) -> None:
        self.buffer = np.zeros((0, 2), dtype=np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["id"])
        if len(self.buffer) < rows:
            self.buffer = np.zeros((rows, 2), dtype=np.float32)
        out = self.buffer[:rows]
        out[:] = batch["id"][:, None]
        return {"id": batch["id"], "embedding": out, "score": out[:, 0]}


class SparseNote:
    """``note`` is null except for ids from ``first_note`` on, where it is text: a sparse output
    column that is all null in the first batches of a shard."""

    def __init__(self, first_note: int = 50):
        self.first_note = first_note

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"id": batch["id"], "note": [f"n{int(i)}" if int(i) >= self.first_note else None for i in batch["id"]]}


class NoteInRange(_Logged):
    """``note`` is text (``"n<id>"``) for ids in ``[text_from, text_to)``, an integer (the id)
    for ids in ``[int_from, int_to)``, and null elsewhere: a sparse output column that is all
    null in whole shards (an error or note field)."""

    def __init__(self, text_from: int = 0, text_to: int = 0, int_from: int = 0, int_to: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.text = (text_from, text_to)
        self.ints = (int_from, int_to)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        self.log(batch["id"])
        ids = [int(i) for i in batch["id"]]
        if any(self.ints[0] <= i < self.ints[1] for i in ids):  # an int column in this batch
            return {"id": batch["id"], "note": [i if self.ints[0] <= i < self.ints[1] else None for i in ids]}
        return {"id": batch["id"], "note": [f"n{i}" if self.text[0] <= i < self.text[1] else None for i in ids]}


class KeyedSlowDoubler(KeyedDoubler, SlowDoubler):
    """``KeyedDoubler`` that sleeps per batch as ``SlowDoubler`` does: a shard that needs a
    secret and takes seconds (the Ray Client tests cut the network while it runs)."""


class CountingDoubler(Doubler):
    """``Doubler`` that reports counters (``docs/counting.md``): ``tokens_in`` (the batch's ids
    summed plus its rows), ``tokens_out`` (3 per row) and one ``batches``; with ``counter`` set,
    it adds 1 to that name instead (a reserved one, to see the shard fail)."""

    def __init__(self, counter: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.counter = counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from airflow_batch_provider.counters import add

        if self.counter:
            add(self.counter, 1)
        else:
            add("tokens_in", int(batch["id"].sum()) + len(batch["id"]))
            add("tokens_out", 3 * len(batch["id"]))
            add("batches")
        return super().__call__(batch)
