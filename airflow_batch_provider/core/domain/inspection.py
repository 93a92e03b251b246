"""A sink as its operators see it: status, verification against the sentinels, and clean-up.

Everything here works from the sink's own files (the plan, the sentinels, the quarantine, the
staged leftovers), without the job's spec, so that the status page, the CLI and a person with
only a sink URL get the same answers. Status and verification only read; clean-up removes only
what no sentinel references and what is older than the caller's grace period.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_batch_provider.core.domain import layout
from airflow_batch_provider.core.domain.planning import Plan
from airflow_batch_provider.core.spec import default_checkpoint_root
from airflow_batch_provider.core.stores import Store, store_for

_READ_THREADS = 32
_HASH_BLOCK = 8 << 20
#: sentinels are created once and never change: a long-lived reader (the status page in the
#: api-server) keeps the ones it has read, keyed by path and version, and fetches only new ones.
_SENTINELS_KEPT = 500_000
_sentinel_cache: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
_cache_lock = threading.Lock()


@dataclass
class Commit:
    """One committed shard, as its sentinel records it."""

    shard_id: str
    part: str
    rows_in: int
    rows_out: int
    rows_rejected: int
    bytes: int
    committed_at: float | None


@dataclass
class SinkStatus:
    """Figures of one sink: what the status page and ``airflow-batch status`` show."""

    sink: str
    checkpoint_dir: str
    planned_shards: int = 0
    planned_rows: int = 0
    committed: int = 0
    pending: int = 0
    quarantined: int = 0
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    bytes: int = 0
    finalized_at: float | None = None
    first_commit_at: float | None = None
    last_commit_at: float | None = None
    #: rows read per minute of commits: ``[(minute start, rows), ...]``, oldest first
    throughput: list[tuple[float, int]] = field(default_factory=list)
    last_commits: list[Commit] = field(default_factory=list)
    seconds: float = 0.0  # how long gathering this took

    @property
    def rows_per_second(self) -> float | None:
        if self.first_commit_at is None or self.last_commit_at is None or self.last_commit_at <= self.first_commit_at:
            return None
        return self.rows_in / (self.last_commit_at - self.first_commit_at)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows_per_second"] = self.rows_per_second
        return data


class SinkFiles:
    """The stores and paths of a sink, known from its URL alone."""

    def __init__(self, sink: str, checkpoint_dir: str | None = None, storage_options: dict[str, Any] | None = None):
        self.sink = sink.rstrip("/")
        self.checkpoint_dir = (checkpoint_dir or default_checkpoint_root(self.sink)).rstrip("/")
        self.sink_store: Store = store_for(self.sink, storage_options)
        self.checkpoint_store: Store = store_for(self.checkpoint_dir, storage_options)

    def plan(self) -> Plan | None:
        path = layout.plan_path(self.checkpoint_dir)
        raw = self.checkpoint_store.read_bytes(path)
        return None if raw is None else Plan.from_json(raw, path)

    def sentinels(self, *, use_manifest: bool = True) -> list[dict[str, Any]]:
        """Every sentinel that parses: one LIST, then a GET for each one not read before (or, with
        ``use_manifest``, the ``_SUCCESS`` manifest's copy of them when it covers every one)."""
        directory = layout.sentinel_dir(self.checkpoint_dir)
        listed = {n: info for n, info in self.checkpoint_store.list_files(directory).items() if n.endswith(layout.SENTINEL_SUFFIX)}
        from_manifest = self._from_manifest(listed) if use_manifest else None
        if from_manifest is not None:
            return from_manifest
        found: dict[str, dict[str, Any]] = {}
        missing = []
        with _cache_lock:
            for name, info in listed.items():
                cached = _sentinel_cache.get((f"{directory}/{name}", info.version))
                if cached is None:
                    missing.append(name)
                else:
                    found[name] = cached

        def read(name: str) -> tuple[str, dict[str, Any] | None]:
            try:
                data = json.loads(self.checkpoint_store.read_bytes(f"{directory}/{name}") or b"")
            except ValueError:
                return name, None
            return name, data if isinstance(data, dict) and "shard_id" in data else None

        with ThreadPoolExecutor(_READ_THREADS) as pool:
            fetched = [(n, d) for n, d in pool.map(read, missing) if d is not None]
        with _cache_lock:
            for name, data in fetched:
                found[name] = data
                _sentinel_cache[(f"{directory}/{name}", listed[name].version)] = data
            while len(_sentinel_cache) > _SENTINELS_KEPT:
                _sentinel_cache.popitem(last=False)
        return [found[n] for n in sorted(found)]

    def manifest(self) -> dict[str, Any] | None:
        """``_SUCCESS``, read once per ``SinkFiles``."""
        if not hasattr(self, "_manifest"):
            raw = self.sink_store.read_bytes(layout.manifest_path(self.sink))
            try:
                self._manifest = json.loads(raw) if raw is not None else None
            except ValueError:
                self._manifest = None
        return self._manifest

    def _from_manifest(self, listed: dict[str, Any]) -> list[dict[str, Any]] | None:
        """A finalized sink's ``_SUCCESS`` holds every committed part's figures: one GET instead
        of one per sentinel, when it names exactly the sentinels listed."""
        manifest = self.manifest()
        parts = (manifest or {}).get("parts")
        if not parts or {f"{p.get('shard_id')}{layout.SENTINEL_SUFFIX}" for p in parts} != set(listed):
            return None
        return sorted(parts, key=lambda p: p["shard_id"])


def sink_status(sink: str, checkpoint_dir: str | None = None, storage_options: dict[str, Any] | None = None,
                *, last: int = 10) -> SinkStatus:
    """Shards committed / pending / quarantined, rows, bytes, throughput per minute, last commits."""
    started = time.perf_counter()
    files = SinkFiles(sink, checkpoint_dir, storage_options)
    status = SinkStatus(sink=files.sink, checkpoint_dir=files.checkpoint_dir)
    plan = files.plan()
    sentinels = files.sentinels()
    committed_ids = {s["shard_id"] for s in sentinels}
    if plan is not None:
        status.planned_shards, status.planned_rows = len(plan.shards), plan.total_rows
        status.pending = sum(1 for s in plan.shards if s.shard_id not in committed_ids)
    status.committed = len(sentinels)
    status.quarantined = len(files.checkpoint_store.list_files(layout.quarantine_dir(files.checkpoint_dir)))
    commits = [
        Commit(s["shard_id"], str(s.get("part") or ""), int(s.get("rows_in", 0)), int(s.get("rows_out", 0)),
               int(s.get("rows_rejected", 0)), int(s.get("bytes", 0)), s.get("committed_at"))
        for s in sentinels
    ]
    status.rows_in = sum(c.rows_in for c in commits)
    status.rows_out = sum(c.rows_out for c in commits)
    status.rows_rejected = sum(c.rows_rejected for c in commits)
    status.bytes = sum(c.bytes for c in commits)
    stamped = sorted((c for c in commits if c.committed_at), key=lambda c: c.committed_at)
    if stamped:
        status.first_commit_at, status.last_commit_at = stamped[0].committed_at, stamped[-1].committed_at
        per_minute: dict[float, int] = {}
        for commit in stamped:
            minute = commit.committed_at - commit.committed_at % 60
            per_minute[minute] = per_minute.get(minute, 0) + commit.rows_in
        status.throughput = sorted(per_minute.items())
        status.last_commits = stamped[-last:][::-1]
    status.finalized_at = (files.manifest() or {}).get("finalized_at")
    status.seconds = time.perf_counter() - started
    return status


@dataclass
class Verification:
    checked: int
    problems: list[str]


def verify_sink(sink: str, checkpoint_dir: str | None = None, storage_options: dict[str, Any] | None = None) -> Verification:
    """Re-read every committed part and compare its size and sha256 with its sentinel."""
    files = SinkFiles(sink, checkpoint_dir, storage_options)
    sentinels = files.sentinels(use_manifest=False)

    def check(sentinel: dict[str, Any]) -> str:
        if "part" in sentinel and sentinel["part"] is None:
            return ""  # a shard that produced no rows commits without a part
        part = f"{files.sink}/{sentinel.get('part', '')}"
        digest, size = hashlib.sha256(), 0
        try:
            with files.sink_store.open_read(part) as handle:
                while block := handle.read(_HASH_BLOCK):
                    digest.update(block)
                    size += len(block)
        except FileNotFoundError:
            return f"{part}: missing (shard {sentinel['shard_id']} is committed)"
        if size != sentinel.get("bytes"):
            return f"{part}: {size} bytes, its sentinel says {sentinel.get('bytes')}"
        if sentinel.get("sha256") and digest.hexdigest() != sentinel["sha256"]:
            return f"{part}: sha256 {digest.hexdigest()} differs from its sentinel's {sentinel['sha256']}"
        return ""

    with ThreadPoolExecutor(8) as pool:
        problems = [p for p in pool.map(check, sentinels) if p]
    return Verification(checked=len(sentinels), problems=sorted(problems))


def collect_garbage(sink: str, checkpoint_dir: str | None = None, storage_options: dict[str, Any] | None = None,
                    *, older_than_s: float, apply: bool = False) -> list[str]:
    """What a crashed or losing attempt left behind, older than ``older_than_s``: staged parts
    (hidden files, uncompleted multipart uploads) that no sentinel references, and quarantine
    entries. Returns a line per item; removes them only with ``apply``."""
    files = SinkFiles(sink, checkpoint_dir, storage_options)
    cutoff = time.time() - older_than_s
    referenced = {json.dumps(s["staged"], sort_keys=True) for s in files.sentinels(use_manifest=False) if s.get("staged")}
    found = []
    for staged in files.sink_store.list_staged(files.sink):
        if staged.started_at is None or staged.started_at > cutoff:
            continue
        if any(_same_staged(staged.handle, json.loads(ref)) for ref in referenced):
            continue  # committed, not yet published: the next check of its shard publishes it
        found.append((f"staged part for {staged.final_path} (started {_ago(staged.started_at)})", staged.abort))
    quarantine = layout.quarantine_dir(files.checkpoint_dir)
    for name in files.checkpoint_store.list_files(quarantine):
        modified = files.checkpoint_store.modified_at(f"{quarantine}/{name}")
        if modified is not None and modified <= cutoff:
            path = f"{quarantine}/{name}"
            found.append((f"quarantine entry {path} ({_ago(modified)})", lambda path=path: files.checkpoint_store.delete(path)))
    lines = []
    for what, remove in found:
        if apply:
            remove()
        lines.append(("removed " if apply else "would remove ") + what)
    return lines


def _same_staged(handle: dict[str, Any], referenced: dict[str, Any]) -> bool:
    keys = ("staged", "upload_id")
    return any(handle.get(k) and handle.get(k) == referenced.get(k) for k in keys)


def _ago(stamp: float) -> str:
    minutes = (time.time() - stamp) / 60
    return f"{minutes:.0f} min ago" if minutes < 120 else f"{minutes / 60:.1f} h ago"
