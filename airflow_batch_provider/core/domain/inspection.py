"""A sink as its operators see it: status, verification against the sentinels, and clean-up.

Everything here works from the sink's own files (the plan, the sentinels, the quarantine, the
staged leftovers), without the job's spec, so that the status page, the CLI and a person with
only a sink URL get the same answers. Status and verification only read; clean-up removes only
what no sentinel references and what is older than the caller's grace period.

A place that holds no plan, no sentinel and no ``_SUCCESS`` is not a sink (a typo, or a
checkpoint kept elsewhere): every function here raises :class:`NotASinkError` rather than
report zeros. Anything else that is wrong (a sentinel that does not parse, a part no sentinel
names, a committed part gone, a plan or ``_SUCCESS`` that disagrees with the sentinels) is a
*problem*: status lists the ones its listings show, verification those and every byte.
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

from airflow_batch_provider.core.counters import GPU_SECONDS, MODEL_SECONDS, REPLICA_SECONDS, cost, summed
from airflow_batch_provider.core.domain.layout import SENTINEL_SUFFIX, SinkLayout
from airflow_batch_provider.core.domain.planning import Plan
from airflow_batch_provider.core.errors import BatchError
from airflow_batch_provider.core.stores import FileInfo
from airflow_batch_provider.core.tunables import HASH_BLOCK, LAST_COMMITS_SHOWN, SENTINEL_READ_THREADS, SENTINELS_KEPT, VERIFY_THREADS

#: sentinels are created once and never change: a long-lived reader (the status page in the
#: api-server) keeps the ones it has read (``SENTINELS_KEPT`` at most), keyed by path and
#: version, and fetches only new ones.
_sentinel_cache: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
_cache_lock = threading.Lock()


class NotASinkError(BatchError):
    """Nothing of a batch job where a sink was named: no plan, no sentinel, no ``_SUCCESS``."""


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
    #: what computing it took: the predictor's counters and the runner's seconds (``core/counters.py``)
    counters: dict[str, Any] = field(default_factory=dict)


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
    #: re-drives committed (``domain/redrive.py``), the rows they computed again, and the
    #: rejected-rows files still in ``_rejected/`` (what a re-drive would take next)
    redrives: int = 0
    rows_redriven: int = 0
    rejected_files: int = 0
    finalized_at: float | None = None
    #: when ``plan.json`` was last written: the start the speed is measured from
    planned_at: float | None = None
    first_commit_at: float | None = None
    last_commit_at: float | None = None
    #: rows read per minute of commits: ``[(minute start, rows), ...]``, oldest first
    throughput: list[tuple[float, int]] = field(default_factory=list)
    last_commits: list[Commit] = field(default_factory=list)
    seconds: float = 0.0  # how long gathering this took
    #: what the listings show wrong (a committed part gone, a part no sentinel names, ...)
    problems: list[str] = field(default_factory=list)
    #: the committed shards' counters added up: the predictor's (``tokens_in``...) and the
    #: runner's (``replica_seconds``, ``model_seconds``, ``gpu_seconds``); see docs/counting.md
    counters: dict[str, Any] = field(default_factory=dict)
    #: the price of a GPU-hour the cost is figured at (the caller's, else ``_SUCCESS``'s, else
    #: the one the newest commit recorded); None: no cost is shown
    gpu_hour_price: float | None = None

    @property
    def cost(self) -> float | None:
        """``gpu_seconds / 3600 * gpu_hour_price`` of the committed shards (None without a price)."""
        return cost(self.counters, self.gpu_hour_price)

    @property
    def counters_per_second(self) -> dict[str, float]:
        """Each of the predictor's counters (``tokens_out``...) over the time ``rows_per_second``
        is measured over: tokens/s beside rows/s."""
        span = self._span()
        if span is None:
            return {}
        return {name: value / span for name, value in self.counters.items() if name not in _RUNNER_FIGURES}

    @property
    def rows_per_second(self) -> float | None:
        """Rows read from the plan's writing to the last commit. Not from the first commit: that
        leaves out the first shards' own compute time and overstates the speed (by how much:
        docs/benchmarks.md, "The speed airflow-batch status shows"). It includes waits for workers, and a job resumed long after
        its plan shows a lower figure than it runs at (the rows per minute show that)."""
        span = self._span()
        return None if span is None else self.rows_in / span

    def _span(self) -> float | None:
        start = self.planned_at
        if start is None or self.last_commit_at is None or self.last_commit_at <= start:
            return None
        return self.last_commit_at - start

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows_per_second"] = self.rows_per_second
        data["counters_per_second"] = self.counters_per_second
        data["cost"] = self.cost
        data["healthy"] = self.healthy
        return data


_RUNNER_FIGURES = (REPLICA_SECONDS, MODEL_SECONDS, GPU_SECONDS)


class SinkReading:
    """What one status, verify or gc call reads of a sink, through its :class:`SinkLayout`
    (``files``, the one owner of where the files are and how they parse): ``_SUCCESS`` read
    once, the sentinels listed, and those that did not parse."""

    def __init__(self, sink: str, checkpoint_dir: str | None = None, storage_options: dict[str, Any] | None = None):
        self.files = SinkLayout.at(sink, checkpoint_dir, storage_options)
        #: the sentinel files the last ``sentinels()`` listed, by name
        self.listed_sentinels: dict[str, FileInfo] = {}
        #: sentinel files that do not parse as a commit record, found by the last ``sentinels()``
        self.unreadable: list[str] = []

    def require_sink(self, plan: Plan | None) -> None:
        """Raise :class:`NotASinkError` when nothing of a job is there (after ``sentinels()``)."""
        files = self.files
        if plan is None and not self.listed_sentinels and self.manifest_raw() is None:
            raise NotASinkError(
                f"{files.sink_root} is not the sink of a batch job: there is no {files.plan_path}, no "
                f"sentinel in {files.sentinel_dir} and no {files.manifest_path}. "
                "Check the path; if the job sets checkpoint_dir, pass it (--checkpoint-dir)."
            )

    def outputs(self) -> tuple[dict[str, FileInfo], dict[str, FileInfo]]:
        """The part files and rejected-row files in the sink, by name: two listings."""
        return self.files.part_files(), self.files.rejected_files()

    def sentinels(self, *, use_manifest: bool = True) -> list[dict[str, Any]]:
        """Every sentinel that names its shard (read leniently: see ``layout.parse_sentinel``):
        one LIST, then a GET for each one not read before (or, with ``use_manifest``, the
        ``_SUCCESS`` manifest's copy of them when it covers every one)."""
        files = self.files
        directory = files.sentinel_dir
        listed = self.listed_sentinels = files.sentinel_files()
        self.unreadable = []
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
            return name, files.read_sentinel(name[: -len(SENTINEL_SUFFIX)], strict=False).record

        with ThreadPoolExecutor(SENTINEL_READ_THREADS) as pool:
            read_now = list(pool.map(read, missing))
        fetched = [(n, d) for n, d in read_now if d is not None]
        self.unreadable = sorted(f"{directory}/{n}" for n, d in read_now if d is None)
        with _cache_lock:
            for name, data in fetched:
                found[name] = data
                _sentinel_cache[(f"{directory}/{name}", listed[name].version)] = data
            while len(_sentinel_cache) > SENTINELS_KEPT:
                _sentinel_cache.popitem(last=False)
        return [found[n] for n in sorted(found)]

    def redrive_links(self) -> list[dict[str, Any]]:
        """Every re-drive sentinel that names its unit (read leniently): one listing, then a
        GET each (none when nothing was ever re-driven). Unreadable ones join ``unreadable``."""
        files = self.files
        listed = files.redrive_sentinel_files()

        def read(name: str) -> tuple[str, dict[str, Any] | None]:
            return name, files.read_redrive_sentinel(name[: -len(SENTINEL_SUFFIX)], strict=False).record

        with ThreadPoolExecutor(SENTINEL_READ_THREADS) as pool:
            read_now = list(pool.map(read, sorted(listed)))
        self.unreadable += sorted(f"{files.redrive_dir}/{n}" for n, d in read_now if d is None)
        return [d for _, d in read_now if d is not None]

    def manifest_raw(self) -> bytes | None:
        """``_SUCCESS``'s bytes, read once per ``SinkReading``."""
        if not hasattr(self, "_manifest_raw"):
            self._manifest_raw = self.files.sink.read_bytes(self.files.manifest_path)
        return self._manifest_raw

    def manifest(self) -> dict[str, Any] | None:
        """``_SUCCESS`` parsed; None when absent or unreadable (``problems`` names the latter)."""
        raw = self.manifest_raw()
        try:
            data = json.loads(raw) if raw is not None else None
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def _from_manifest(self, listed: dict[str, Any]) -> list[dict[str, Any]] | None:
        """A finalized sink's ``_SUCCESS`` holds every committed part's figures: one GET instead
        of one per sentinel, when it names exactly the sentinels listed."""
        manifest = self.manifest()
        parts = [p for p in (manifest or {}).get("parts") or [] if isinstance(p, dict) and not p.get("redrive_of")]
        if not parts or {f"{p.get('shard_id')}{SENTINEL_SUFFIX}" for p in parts} != set(listed):
            return None
        return sorted(parts, key=lambda p: p["shard_id"])


def retired_names(links: list[dict[str, Any]]) -> set[str]:
    """The rejected-row files that committed re-drives retired (moved to ``_rejected/_retired/``)."""
    return {(link.get("retires") or {}).get("name") for link in links} - {None}


def layout_problems(reading: SinkReading, plan: Plan | None, sentinels: list[dict[str, Any]],
                    before: tuple[dict[str, Any], dict[str, Any]], *, check_parts: bool,
                    links: list[dict[str, Any]] = ()) -> list[str]:
    """What the listings show wrong, one line each: sentinels that do not parse, part and
    rejected-row files that no sentinel names, and (``check_parts``) committed files gone or of
    another size; a plan and a ``_SUCCESS`` that disagree with the sentinels. Listings only, no
    read of a part: cheap enough for the status page's every refresh.

    ``before`` is the sink listed before the sentinels were: a shard creates its sentinel
    before it publishes its part, so a part listed then and named by no sentinel listed after
    is not a commit in flight. Committed files are looked for in a listing made after."""
    files, problems = reading.files, []
    sink = files.sink_root
    problems += [f"{path}: the sentinel does not parse as the commit record of its shard; its shard counts as not "
                 "committed (its task quarantines it and computes the shard again)" for path in reading.unreadable]
    rejected_dir = files.rejected_dir
    parts, rejected = reading.outputs() if check_parts else before
    named_parts, named_rejected = set(), set()
    retired = retired_names(links)
    for sentinel in [*sentinels, *links]:
        shard_id, part, record = sentinel["shard_id"], sentinel.get("part"), sentinel.get("rejected")
        expected = [(sink, part, sentinel.get("bytes"), parts)] if part else []
        if record:  # a sentinel holds {name, bytes, ...}; _SUCCESS's copy only the name
            name = record.get("name") if isinstance(record, dict) else record
            expected.append((rejected_dir, name, record.get("bytes") if isinstance(record, dict) else None, rejected))
        for directory, name, size, found in expected:
            (named_parts if found is parts else named_rejected).add(name)
            if not check_parts or (found is rejected and name in retired):  # a retired file lives in _retired/
                continue
            if name not in found:
                problems.append(f"{directory}/{name}: missing (shard {shard_id} is committed)")
            elif size is not None and found[name].size != size:
                problems.append(f"{directory}/{name}: {found[name].size} bytes, its sentinel says {size}")
    problems += [f"{sink}/{name}: no sentinel names this part; readers of the sink see its rows. Move it away "
                 "if it is not this job's" for name in sorted(set(before[0]) - named_parts)]
    problems += [f"{rejected_dir}/{name}: no sentinel names these rejected rows" for name in sorted(set(before[1]) - named_rejected)]
    committed = {s["shard_id"]: s for s in sentinels}
    plan_path = files.plan_path
    if plan is None and committed:
        problems.append(f"{plan_path}: missing, but {len(committed)} shard(s) are committed")
    planned = {s.shard_id for s in plan.shards} if plan is not None else set(committed)
    problems += [f"shard {shard_id} is committed but not in {plan_path} (committed under a superseded plan: planning "
                 "again withdraws it)" for shard_id in sorted(set(committed) - planned)]
    manifest_path = files.manifest_path
    manifest = reading.manifest()
    if reading.manifest_raw() is not None and manifest is None:
        problems.append(f"{manifest_path}: does not parse as JSON; readers cannot trust this sink. Run the finalize task again")
    if manifest is not None:
        listed_parts = {p.get("shard_id"): p for p in manifest.get("parts") or [] if isinstance(p, dict) and not p.get("redrive_of")}
        not_committed = sorted(planned - set(committed))
        if not_committed:
            problems.append(f"{manifest_path} is there, but {len(not_committed)} planned shard(s) are not committed "
                            f"(e.g. {not_committed[0]})")
        if plan is not None and manifest.get("shards") != len(plan.shards):
            problems.append(f"{manifest_path} counts {manifest.get('shards')} shards, {plan_path} plans {len(plan.shards)}")
        problems += [f"{manifest_path} lists shard {shard_id}, which has no sentinel"
                     for shard_id in sorted(set(listed_parts) - set(committed), key=str)]
        problems += [f"shard {shard_id} is committed but {manifest_path} does not list it"
                     for shard_id in sorted(set(committed) - set(listed_parts))]
        for shard_id in sorted(set(listed_parts) & set(committed)):
            said, sentinel = listed_parts[shard_id], committed[shard_id]
            differ = [k for k in ("part", "bytes", "sha256", "rows_out") if k in said and k in sentinel and said[k] != sentinel[k]]
            if differ:
                problems.append(f"{manifest_path}: shard {shard_id}'s {', '.join(differ)} differ from its sentinel's")
    return problems


def sink_status(sink: str, checkpoint_dir: str | None = None, storage_options: dict[str, Any] | None = None,
                *, last: int = LAST_COMMITS_SHOWN, gpu_hour_price: float | None = None) -> SinkStatus:
    """Shards committed / pending / quarantined, rows, bytes, counters, throughput per minute,
    last commits. The cost is figured at ``gpu_hour_price``; without it, at the price
    ``_SUCCESS`` records, else at the one the newest commit recorded (the spec's when it ran)."""
    started = time.perf_counter()
    reading = SinkReading(sink, checkpoint_dir, storage_options)
    files = reading.files
    status = SinkStatus(sink=files.sink_root, checkpoint_dir=files.checkpoint_root)
    plan = files.read_plan()
    before = reading.outputs()
    sentinels = reading.sentinels()
    links = reading.redrive_links()
    reading.require_sink(plan)
    if plan is not None:
        status.planned_at = files.checkpoint.modified_at(files.plan_path)
    committed_ids = {s["shard_id"] for s in sentinels}
    if plan is not None:
        status.planned_shards, status.planned_rows = len(plan.shards), plan.total_rows
        status.pending = sum(1 for s in plan.shards if s.shard_id not in committed_ids)
    status.committed = len(sentinels)
    status.quarantined = len(files.checkpoint.list_files(files.quarantine_dir))
    commits = [
        Commit(s["shard_id"], str(s.get("part") or ""), int(s.get("rows_in", 0)), int(s.get("rows_out", 0)),
               int(s.get("rows_rejected", 0)), int(s.get("bytes", 0)), s.get("committed_at"), dict(s.get("counters") or {}))
        for s in sentinels
    ]
    status.counters = summed([*(c.counters for c in commits), *(link.get("counters") for link in links)])
    retired = retired_names(links)
    current = [s for s in [*sentinels, *links] if _rejected_name(s) and _rejected_name(s) not in retired]
    status.rows_in = sum(c.rows_in for c in commits)
    status.rows_out = sum(c.rows_out for c in commits) + sum(int(link.get("rows_out", 0)) for link in links)
    status.rows_rejected = sum(int(s.get("rows_rejected", 0)) for s in current)
    status.rejected_files = len(current)
    status.redrives, status.rows_redriven = len(links), sum(int(link.get("rows_in", 0)) for link in links)
    status.bytes = sum(c.bytes for c in commits) + sum(int(link.get("bytes", 0)) for link in links)
    stamped = sorted((c for c in commits if c.committed_at), key=lambda c: c.committed_at)
    if stamped:
        status.first_commit_at, status.last_commit_at = stamped[0].committed_at, stamped[-1].committed_at
        per_minute: dict[float, int] = {}
        for commit in stamped:
            minute = commit.committed_at - commit.committed_at % 60
            per_minute[minute] = per_minute.get(minute, 0) + commit.rows_in
        status.throughput = sorted(per_minute.items())
        status.last_commits = stamped[-last:][::-1]
    manifest = reading.manifest() or {}
    status.finalized_at = manifest.get("finalized_at")
    status.gpu_hour_price = _price(gpu_hour_price, manifest, sentinels)
    status.problems = layout_problems(reading, plan, sentinels, before, check_parts=True, links=links)
    status.seconds = time.perf_counter() - started
    return status


def _price(given: float | None, manifest: dict[str, Any], sentinels: list[dict[str, Any]]) -> float | None:
    """The caller's price, else ``_SUCCESS``'s, else the newest commit's that records one."""
    if given is not None:
        return given
    if isinstance(manifest.get("gpu_hour_price"), (int, float)):
        return manifest["gpu_hour_price"]
    priced = [s for s in sentinels if isinstance(s.get("gpu_hour_price"), (int, float))]
    return max(priced, key=lambda s: s.get("committed_at") or 0)["gpu_hour_price"] if priced else None


@dataclass
class Verification:
    checked: int
    problems: list[str]


def verify_sink(sink: str, checkpoint_dir: str | None = None, storage_options: dict[str, Any] | None = None) -> Verification:
    """Re-read every committed part and compare its size and sha256 with its sentinel; and
    everything ``layout_problems`` finds (unreadable sentinels, unknown or missing parts, a plan
    or ``_SUCCESS`` that disagrees with the sentinels)."""
    reading = SinkReading(sink, checkpoint_dir, storage_options)
    files = reading.files
    plan = files.read_plan()
    before = reading.outputs()
    sentinels = reading.sentinels(use_manifest=False)
    links = reading.redrive_links()
    retired = retired_names(links)
    reading.require_sink(plan)

    def check_file(path: str, recorded: dict[str, Any], shard_id: str) -> str:
        digest, size = hashlib.sha256(), 0
        try:
            with files.sink.open_read(path) as handle:
                while block := handle.read(HASH_BLOCK):
                    digest.update(block)
                    size += len(block)
        except FileNotFoundError:
            return f"{path}: missing (shard {shard_id} is committed)"
        if size != recorded.get("bytes"):
            return f"{path}: {size} bytes, its sentinel says {recorded.get('bytes')}"
        if recorded.get("sha256") and digest.hexdigest() != recorded["sha256"]:
            return f"{path}: sha256 {digest.hexdigest()} differs from its sentinel's {recorded['sha256']}"
        return ""

    def check(sentinel: dict[str, Any]) -> str:
        problem = ""
        if not ("part" in sentinel and sentinel["part"] is None):  # a shard with no rows out has no part
            problem = check_file(f"{files.sink_root}/{sentinel.get('part', '')}", sentinel, sentinel["shard_id"])
        rejected = sentinel.get("rejected")
        if not problem and rejected and rejected.get("name") not in retired:
            problem = check_file(files.rejected_path(sentinel["shard_id"]), rejected, sentinel["shard_id"])
        return problem

    with ThreadPoolExecutor(VERIFY_THREADS) as pool:
        problems = [p for p in pool.map(check, [*sentinels, *links]) if p]
    found = set(problems)  # a part gone is named once, by its re-read
    problems += [p for p in layout_problems(reading, plan, sentinels, before, check_parts=False, links=links) if p not in found]
    return Verification(checked=len(sentinels) + len(links), problems=sorted(problems))


def collect_garbage(sink: str, checkpoint_dir: str | None = None, storage_options: dict[str, Any] | None = None,
                    *, older_than_s: float, apply: bool = False) -> list[str]:
    """What a crashed or losing attempt left behind, older than ``older_than_s``: staged parts
    and staged rejected rows (hidden files, uncompleted multipart uploads) that no sentinel
    references, and quarantine
    entries. Returns a line per item; removes them only with ``apply``."""
    reading = SinkReading(sink, checkpoint_dir, storage_options)
    files = reading.files
    cutoff = time.time() - older_than_s
    if files.read_plan() is None:
        # Without the job's sentinels every staged part looks unreferenced, committed ones too.
        raise NotASinkError(
            f"no plan at {files.plan_path}: gc needs the job's checkpoint to know which "
            "staged data is committed. If the job sets checkpoint_dir, pass it (--checkpoint-dir)."
        )
    sentinels = reading.sentinels(use_manifest=False)
    sentinels += reading.redrive_links()  # a re-drive's staged files are committed the same way
    if reading.unreadable:
        raise NotASinkError(
            f"{len(reading.unreadable)} sentinel(s) cannot be read (e.g. {reading.unreadable[0]}): gc cannot tell what "
            "they commit, so it removes nothing. Run verify, and move the broken ones away first."
        )
    referenced = {json.dumps(s["staged"], sort_keys=True) for s in sentinels if s.get("staged")}
    referenced |= {json.dumps(s["rejected"]["staged"], sort_keys=True) for s in sentinels if (s.get("rejected") or {}).get("staged")}
    found = []
    staged_files = files.sink.list_staged(files.sink_root) + files.sink.list_staged(files.rejected_dir)
    for staged in staged_files:
        if staged.started_at is None or staged.started_at > cutoff:
            continue
        last = staged.last_activity()  # a long shard still uploading began long ago, but is alive
        if last is None or last > cutoff:
            continue
        if any(_same_staged(staged.handle, json.loads(ref)) for ref in referenced):
            continue  # committed, not yet published: the next check of its shard publishes it
        found.append((f"staged part for {staged.final_path} (started {_ago(staged.started_at)})", staged.abort))
    quarantine = files.quarantine_dir
    for name in files.checkpoint.list_files(quarantine):
        modified = files.checkpoint.modified_at(f"{quarantine}/{name}")
        if modified is not None and modified <= cutoff:
            path = f"{quarantine}/{name}"
            found.append((f"quarantine entry {path} ({_ago(modified)})", lambda path=path: files.checkpoint.delete(path)))
    lines = []
    for what, remove in found:
        if apply:
            remove()
        lines.append(("removed " if apply else "would remove ") + what)
    return lines


def _rejected_name(commit: dict[str, Any]) -> str | None:
    record = commit.get("rejected")
    return record.get("name") if isinstance(record, dict) else record


def _same_staged(handle: dict[str, Any], referenced: dict[str, Any]) -> bool:
    keys = ("staged", "upload_id")
    return any(handle.get(k) and handle.get(k) == referenced.get(k) for k in keys)


def _ago(stamp: float) -> str:
    minutes = (time.time() - stamp) / 60
    return f"{minutes:.0f} min ago" if minutes < 120 else f"{minutes / 60:.1f} h ago"
