"""The per-shard commit protocol: what makes a shard "done", and nothing else does.

Writing a shard, in order:

1. the part is streamed to a *staged* location that dataset readers never see (a hidden temp
   file on disk, an uncompleted multipart upload on S3) and made durable (fsync / all parts
   uploaded);
2. the sentinel ``{checkpoint_dir}/shards/{shard_id}.json`` is created *create-only* (link on
   disk, ``If-None-Match: *`` on S3). This is the commit point: exactly one attempt wins it.
   It records rows in/out, bytes, sha256, the input and spec fingerprints, the attempt and
   the staged handle;
3. the winner publishes the staged part to ``{sink}/part-{shard_id}.{ext}`` (rename on disk,
   completing the multipart upload on S3), then the rows it rejected (``bad_rows="skip"``),
   staged the same way, to ``{sink}/_rejected/{shard_id}.jsonl`` (a commit that rejected
   nothing deletes any such file an earlier, quarantined commit left: the sentinel, saying
   ``rows_rejected`` 0, is what counts); a loser discards only its own staged files.

A crash before 2 leaves only hidden staged data: the shard is pending and is recomputed.
A crash between 2 and 3 is rolled forward by whoever next checks the shard (the staged
handles are in the sentinel). The rejected rows are one file per shard, written whole, so a
rerun replaces rather than appends: they are never duplicated. A part without a valid sentinel is never counted; a sentinel
whose part is missing or has the wrong size is moved to ``quarantine/`` and the shard is
recomputed; a sentinel of another spec, or of a newer schema than this code knows, fails
closed (``StaleCheckpointError``).

An attempt knows its own commit: a create retried underneath (botocore's retry of the
PUT, NFS's retry of ``link``) answers "exists" to the attempt that made it, which then finds
its own token in the sentinel and publishes. An attempt that carries the id of the plan it
was computed under (``attempt["plan_id"]``) withdraws its commit when that plan has been
replaced by one without its shard; the planner withdraws what such an attempt commits too
late to see the new plan (``withdraw``), so a superseded plan never adds rows to a sink.

A shard's rejected-rows file may later be *retired* by a re-drive (``redrive.py``), which
computed its rows again: it then lives under ``_rejected/_retired/`` and counts as in place.

What this promises a user across crashes and reruns, and how it was tested: docs/guarantees.md.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from airflow_batch_provider.core import failpoints
from airflow_batch_provider.core.domain.layout import (
    SENTINEL_SCHEMA_VERSION,
    InvalidSentinel,
    JobStorage,
    parse_sentinel,
    redrive_id,
    split_redrive_id,
)
from airflow_batch_provider.core.domain.planning import Shard
from airflow_batch_provider.core.errors import CommitError, StaleCheckpointError, StorageError
from airflow_batch_provider.core.spec import JobSpec, describe_fingerprint_change
from airflow_batch_provider.core.stores import StagedPart

log = logging.getLogger(__name__)


@dataclass
class ShardCheck:
    """Outcome of checking one shard's committed state."""

    committed: bool
    sentinel: dict[str, Any] | None = None
    note: str = ""


def new_attempt(key: str = "", **details: Any) -> dict[str, Any]:
    """A new attempt at some shards: a unique ``token`` (names its Ray call and is recorded in
    the sentinel it commits) and the caller's opaque ``key``, shared by every retry of one
    unit of work (so a retry can find what an earlier try left running)."""
    return {"token": uuid.uuid4().hex, "key": key, **details}


def different_spec_error(spec: JobSpec, recorded: dict[str, Any], what: str) -> StaleCheckpointError:
    """The one message for work of another spec found in the sink (never reused silently).

    ``what`` says where it was found, e.g. ``"<sentinel> was committed by"``."""
    changed = describe_fingerprint_change(recorded, spec.fingerprint_inputs())
    return StaleCheckpointError(
        f"{what} a different spec ({changed}). Refusing to mix outputs of two specs in {spec.sink_root}: "
        "write to a new sink, or set resume=False to delete this job's earlier output and start fresh."
    )


def check_shard(storage: JobStorage, shard: Shard) -> ShardCheck:
    """Is this shard committed, with its part in place? Heals what it safely can: rolls a
    commit whose part was never published forward, quarantines a sentinel it cannot trust.

    Raises StaleCheckpointError when the shard was committed by a different spec.
    """
    sentinel, invalid = _read_sentinel(storage, shard)
    if invalid:
        return ShardCheck(committed=False, note=quarantine(storage, shard.shard_id, invalid))
    if sentinel is None:
        return ShardCheck(committed=False)
    problem, rolled = _published_problem(storage, storage.part_path(shard.shard_id), sentinel) if _has_part(sentinel) else ("", False)
    rejected = sentinel.get("rejected")
    if not problem and rejected and not _retired(storage, shard.shard_id, rejected):
        problem, _ = _published_problem(storage, storage.rejected_path(shard.shard_id), rejected)
    if problem:
        return ShardCheck(False, note=quarantine(storage, shard.shard_id, problem))
    if rolled and not rejected:
        remove_stale_rejected(storage, shard.shard_id)  # the crashed commit's last step
    return ShardCheck(committed=True, sentinel=sentinel)


def _published_problem(storage: JobStorage, path: str, record: dict[str, Any]) -> tuple[str, bool]:
    """What is wrong with a file a sentinel committed (its part, or its rejected rows), after
    rolling forward a commit that was never published ("" when it is in place), and whether
    it was rolled forward. A file of another size in its place is an earlier, quarantined
    commit's (this one's is still staged): publishing replaces it."""
    size = storage.sink.size(path)
    if size != record["bytes"] and record.get("staged"):
        problem = _roll_forward(storage, record["staged"])
        if problem:
            return problem, False
        return _part_problem(path, record, storage.sink.size(path)), True
    return _part_problem(path, record, size), False


def inspect_shard(storage: JobStorage, shard: Shard) -> ShardCheck:
    """:func:`check_shard` without healing: reads only, for processes that must not write to
    the sink (the triggerer). A commit not yet published counts as not committed here."""
    sentinel, invalid = _read_sentinel(storage, shard)
    if sentinel is None:
        return ShardCheck(committed=False, note=invalid)
    problem = ""
    if _has_part(sentinel):
        part = storage.part_path(shard.shard_id)
        problem = _part_problem(part, sentinel, storage.sink.size(part))
    if not problem and sentinel.get("rejected") and not _retired(storage, shard.shard_id, sentinel["rejected"]):
        path = storage.rejected_path(shard.shard_id)
        problem = _part_problem(path, sentinel["rejected"], storage.sink.size(path))
    return ShardCheck(committed=not problem, sentinel=None if problem else sentinel, note=problem)


def _retired(storage: JobStorage, unit_id: str, record: dict[str, Any]) -> bool:
    """Whether the rejected-rows file ``record`` names is missing from ``_rejected/`` because
    the next re-drive of ``unit_id`` retired it (``redrive.py``): then it is in place. The
    re-drive sentinel is read only when the file is missing."""
    if storage.sink.size(storage.rejected_path(unit_id)) is not None:
        return False
    shard_id, generation = split_redrive_id(unit_id)
    link = storage.read_redrive_sentinel(redrive_id(shard_id, generation + 1)).record
    return link is not None and (link.get("retires") or {}).get("sha256") == record.get("sha256")


def _read_sentinel(storage: JobStorage, shard: Shard) -> tuple[dict[str, Any] | None, str]:
    """(sentinel, "") for a valid one of this job, (None, why) for one that cannot be
    trusted, (None, "") for none. Raises StaleCheckpointError for another spec or input,
    or a schema newer than this code."""
    read = storage.read_sentinel(shard.shard_id)
    if read.record is None:
        return None, read.invalid
    sentinel, path, spec = read.record, storage.sentinel_path(shard.shard_id), storage.spec
    if sentinel["spec_fingerprint"] != spec.fingerprint:
        raise different_spec_error(spec, sentinel.get("fingerprint_inputs", {}), f"{path} was committed by")
    if sentinel["input_fingerprint"] != shard.input_fingerprint:
        raise StaleCheckpointError(
            f"{path} covers input {sentinel['input_fingerprint']}, but the plan now has "
            f"{shard.input_fingerprint}; the input changed. Restore it, or set resume=False to start fresh."
        )
    return sentinel, ""


def _roll_forward(storage: JobStorage, handle: dict[str, Any]) -> str:
    """Publish a committed file left staged (a crash between commit and publish); the reason
    when that fails for good (S3 ``InvalidPart``, a final path the store refuses): the shard
    is then given back and computed afresh, rather than failing every later plan."""
    try:
        storage.sink.staged_from(handle).publish()
    except StorageError as err:
        return f"its staged part cannot be published ({err})"
    return ""


def _abort(*staged: StagedPart | None) -> None:
    for part in staged:
        if part is not None:
            part.abort()


def _gone(shard: Shard, final_path: str) -> CommitError:
    return CommitError(
        f"shard {shard.description}: committed, but its staged data is gone, so {final_path} could "
        "not be published (aborted by a clean-up?). Retry the task: it quarantines the sentinel "
        "and computes the shard again."
    )


def _has_part(sentinel: dict[str, Any]) -> bool:
    """False for a shard that produced no rows: it commits without a part (``part`` null)."""
    return not ("part" in sentinel and sentinel["part"] is None)


def _part_problem(part: str, sentinel: dict[str, Any], size: int | None) -> str:
    if size is None:
        return f"{part} is missing"
    if size != sentinel["bytes"]:
        return f"{part} has {size} bytes, its sentinel says {sentinel['bytes']} (truncated or overwritten)"
    return ""


def quarantine(storage: JobStorage, shard_id: str, reason: str) -> str:
    """Move a sentinel that cannot be trusted out of the way, so the shard is recomputed.

    Conditional: the sentinel is removed only if it still holds what was judged (a valid
    sentinel another attempt committed in between stays, and the shard counts as pending
    only for this caller, which finds it committed on its next check). A sentinel of a
    newer schema never gets here: ``parse_sentinel`` fails closed on it."""
    path = storage.sentinel_path(shard_id)
    raw = storage.checkpoint.read_bytes(path)
    if raw is None:
        return f"shard {shard_id}: {reason}; its sentinel is already gone, the shard will be recomputed"
    target = storage.quarantine_path(shard_id, int(time.time() * 1000))
    record = json.dumps({"reason": reason, "sentinel": raw.decode("utf-8", "replace")}).encode()
    storage.checkpoint.write_atomic(target, record)
    if not storage.checkpoint.remove_if_unchanged(path, raw):
        storage.checkpoint.delete(target)
        note = f"shard {shard_id}: {reason}; but its sentinel changed meanwhile (another attempt committed it), kept"
        log.warning("%s", note)
        return note
    note = f"shard {shard_id}: {reason}; sentinel moved to {target}, the shard will be recomputed"
    log.warning("%s", note)
    return note


def withdraw(storage: JobStorage, shard_id: str, raw: bytes, sentinel: dict[str, Any]) -> bool:
    """Take back one commit of this job: its staged data, its part, then its sentinel (only
    if the sentinel still holds ``raw``). The staged data goes first, so an attempt that
    publishes late fails instead of leaving a part without a sentinel. False: the sentinel
    changed meanwhile, nothing was removed."""
    current = storage.checkpoint.read_bytes(storage.sentinel_path(shard_id))
    if current != raw:
        return False
    rejected = sentinel.get("rejected") or {}
    _abort(*(storage.sink.staged_from(h) for h in (sentinel.get("staged"), rejected.get("staged")) if h))
    part = sentinel.get("part", storage.part_name(shard_id))  # null: the shard wrote no rows
    if part:
        storage.sink.delete(f"{storage.spec.sink_root}/{part}")
    if rejected:
        storage.sink.delete(storage.rejected_path(shard_id))
    return storage.checkpoint.remove_if_unchanged(storage.sentinel_path(shard_id), raw)


def sentinel_record(
    storage: JobStorage,
    unit: Shard,
    staged: StagedPart | None,
    *,
    rejected_name: str,
    rows_in: int,
    rows_out: int,
    lines: int,
    attempt: dict[str, Any],
    rejected: StagedPart | None,
    rows_rejected: int,
    null_columns: list[str] | None,
    counters: dict[str, Any] | None,
) -> dict[str, Any]:
    """The commit record of a shard or a re-drive unit (``redrive.py`` adds its own keys):
    what was computed, where it is staged, and what the spec and input were."""
    spec = storage.spec
    record = {
        "schema_version": SENTINEL_SCHEMA_VERSION,
        "shard_id": unit.shard_id,
        "part": storage.part_name(unit.shard_id) if staged is not None else None,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_rejected": rows_rejected,
        "rejected": None if rejected is None else {
            "name": rejected_name,
            "bytes": rejected.stream.bytes_written,
            "sha256": rejected.stream.sha256,
            "staged": rejected.handle,
        },
        "lines": lines,
        "null_columns": list(null_columns or []) if staged is not None else [],
        "bytes": staged.stream.bytes_written if staged is not None else 0,
        "sha256": staged.stream.sha256 if staged is not None else None,
        "input_fingerprint": unit.input_fingerprint,
        "spec_fingerprint": spec.fingerprint,
        "fingerprint_inputs": spec.fingerprint_inputs(),
        "attempt": attempt,
        "sink": spec.sink_root,
        "staged": staged.handle if staged is not None else None,
        "committed_at": time.time(),
        "counters": dict(counters or {}),
    }
    if spec.gpu_hour_price is not None:
        record["gpu_hour_price"] = spec.gpu_hour_price
    return record


def commit_shard(
    storage: JobStorage,
    shard: Shard,
    staged: StagedPart | None,
    *,
    rows_in: int,
    rows_out: int,
    lines: int,
    attempt: dict[str, Any],
    rejected: StagedPart | None = None,
    rows_rejected: int = 0,
    null_columns: list[str] | None = None,
    counters: dict[str, Any] | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Create the sentinel (the commit point), then publish or discard the staged part and
    the staged rejected rows (``rejected``, holding ``rows_rejected`` rows; None when none).

    Returns (won, sentinel): ``won`` is False when another attempt committed first; the
    returned sentinel is then the winner's. ``staged`` is None for a shard that produced no
    rows: it commits without a part (its sentinel's ``part`` is null). ``null_columns``: the
    columns the (Parquet) part holds as type null, which finalize re-types if the job's output
    schema gives them a type later (``domain/retype.py``): no part has to be opened to find them.
    ``counters``: what computing the shard took (``core/counters.py``), recorded with the
    spec's ``gpu_hour_price`` when it sets one (so that a reader without the spec can price it).
    """
    sentinel = sentinel_record(
        storage, shard, staged, rejected_name=storage.rejected_path(shard.shard_id).rsplit("/", 1)[-1], rows_in=rows_in,
        rows_out=rows_out, lines=lines, attempt=attempt, rejected=rejected, rows_rejected=rows_rejected,
        null_columns=null_columns, counters=counters,
    )
    failpoints.hit("before_sentinel")
    path = storage.sentinel_path(shard.shard_id)
    raw = json.dumps(sentinel, sort_keys=True).encode()
    if not storage.checkpoint.create_exclusive(path, raw):
        found = storage.checkpoint.read_bytes(path)
        if found is None:
            _abort(staged, rejected)
            raise CommitError(
                f"shard {shard.description}: the sentinel {path} existed when this attempt tried to "
                "create it, and was gone a moment later (quarantined by another check); nothing of "
                "this attempt was kept. Retry the task: it computes the shard again."
            )
        try:
            winner = parse_sentinel(found, path, shard.shard_id)
        except InvalidSentinel as err:
            _abort(staged, rejected)
            raise CommitError(f"shard {shard.description}: {err}. Retry the task: it quarantines that sentinel and computes the shard.") from None
        if (winner.get("attempt") or {}).get("token") != attempt.get("token") or winner.get("staged") != sentinel["staged"]:
            _abort(staged, rejected)
            return False, winner
        # Our own create, retried underneath (its first try did land): we won.
        log.info("shard %s: the sentinel's create was retried underneath; it holds this attempt's token", shard.shard_id)
        sentinel, raw = winner, found
    if not plan_still_has(storage, shard, attempt):
        withdraw(storage, shard.shard_id, raw, sentinel)
        raise CommitError(
            f"shard {shard.description} was computed under plan {attempt.get('plan_id')}, which has "
            "since been replaced by a plan without this shard (rows_per_shard or the input changed): "
            "its commit was withdrawn. Nothing to do: the new plan's tasks compute these rows."
        )
    failpoints.hit("before_publish")
    if staged is not None and not staged.publish():
        raise _gone(shard, storage.part_path(shard.shard_id))
    failpoints.hit("before_publish_rejected")
    if rejected is not None:
        if not rejected.publish():
            raise _gone(shard, storage.rejected_path(shard.shard_id))
    else:
        remove_stale_rejected(storage, shard.shard_id)
    return True, sentinel


def remove_stale_rejected(storage: JobStorage, shard_id: str) -> None:
    """Delete the ``_rejected/{shard_id}.jsonl`` an earlier commit of this shard left (its
    sentinel quarantined, the shard recomputed rejecting nothing): the sentinel that stands
    says no rows were rejected, and its rows are all in the part now. Done after the part
    is published, again when a commit is rolled forward, and by finalize."""
    storage.sink.delete(storage.rejected_path(shard_id))


def plan_still_has(storage: JobStorage, shard: Shard, attempt: dict[str, Any]) -> bool:
    """Whether the plan this attempt was computed under still stands, or the plan that
    replaced it still holds this shard. One small read (the plan id) in the common case."""
    plan_id = attempt.get("plan_id")
    if not plan_id:
        return True  # a caller that does not track plans (tests, benchmarks)
    current = storage.checkpoint.read_bytes(storage.plan_id_path)
    if current is not None and current.decode().strip() == plan_id:
        return True
    plan = storage.read_plan()
    if plan is None:
        return False  # reset (resume=False) since: this work belongs to no plan
    return plan.spec_fingerprint == storage.spec.fingerprint and any(s.shard_id == shard.shard_id for s in plan.shards)
