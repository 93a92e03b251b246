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
   completing the multipart upload on S3); a loser discards only its own staged part.

A crash before 2 leaves only hidden staged data: the shard is pending and is recomputed.
A crash between 2 and 3 is rolled forward by whoever next checks the shard (the staged
handle is in the sentinel). A part without a valid sentinel is never counted; a sentinel
whose part is missing or has the wrong size is moved to ``quarantine/`` and the shard is
recomputed; a sentinel of another spec fails closed (``StaleCheckpointError``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from airflow_batch_provider.core import failpoints
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.domain.planning import Shard
from airflow_batch_provider.core.errors import StaleCheckpointError
from airflow_batch_provider.core.spec import BatchSpec, describe_fingerprint_change
from airflow_batch_provider.core.stores import StagedPart

log = logging.getLogger(__name__)

SENTINEL_SCHEMA_VERSION = 1


@dataclass
class ShardCheck:
    """Outcome of checking one shard's committed state."""

    committed: bool
    sentinel: dict[str, Any] | None = None
    note: str = ""


class InvalidSentinel(Exception):
    """A sentinel that cannot be trusted (corrupt, unknown schema, wrong shard)."""


def new_attempt(key: str = "", **details: Any) -> dict[str, Any]:
    """A new attempt at some shards: a unique ``token`` (names its Ray call and is recorded in
    the sentinel it commits) and the caller's opaque ``key``, shared by every retry of one
    unit of work (so a retry can find what an earlier try left running)."""
    return {"token": uuid.uuid4().hex, "key": key, **details}


def different_spec_error(spec: BatchSpec, recorded: dict[str, Any], what: str) -> StaleCheckpointError:
    """The one message for work of another spec found in the sink (never reused silently).

    ``what`` says where it was found, e.g. ``"<sentinel> was committed by"``."""
    changed = describe_fingerprint_change(recorded, spec.fingerprint_inputs())
    return StaleCheckpointError(
        f"{what} a different spec ({changed}). Refusing to mix outputs of two specs in {spec.sink_root}: "
        "write to a new sink, or set resume=False to delete this job's earlier output and start fresh."
    )


def parse_sentinel(raw: bytes, where: str, shard_id: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise InvalidSentinel(f"{where}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise InvalidSentinel(f"{where}: not a JSON object")
    if data.get("schema_version") != SENTINEL_SCHEMA_VERSION:
        raise InvalidSentinel(f"{where}: unknown schema_version {data.get('schema_version')!r}")
    missing = [k for k in ("shard_id", "bytes", "rows_out", "spec_fingerprint", "input_fingerprint") if k not in data]
    if missing:
        raise InvalidSentinel(f"{where}: missing field(s) {missing}")
    if data["shard_id"] != shard_id:
        raise InvalidSentinel(f"{where}: records shard {data['shard_id']!r}, not {shard_id!r}")
    return data


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
    if "part" in sentinel and sentinel["part"] is None:
        return ShardCheck(committed=True, sentinel=sentinel)  # no rows out: committed without a part
    part = storage.part_path(shard.shard_id)
    size = storage.sink.size(part)
    if size is None and sentinel.get("staged"):
        storage.sink.staged_from(sentinel["staged"]).publish()  # roll forward a crash between commit and publish
        size = storage.sink.size(part)
    problem = _part_problem(part, sentinel, size)
    if problem:
        return ShardCheck(False, note=quarantine(storage, shard.shard_id, problem))
    return ShardCheck(committed=True, sentinel=sentinel)


def inspect_shard(storage: JobStorage, shard: Shard) -> ShardCheck:
    """:func:`check_shard` without healing: reads only, for processes that must not write to
    the sink (the triggerer). A commit not yet published counts as not committed here."""
    sentinel, invalid = _read_sentinel(storage, shard)
    if sentinel is None:
        return ShardCheck(committed=False, note=invalid)
    if "part" in sentinel and sentinel["part"] is None:
        return ShardCheck(committed=True, sentinel=sentinel)
    part = storage.part_path(shard.shard_id)
    problem = _part_problem(part, sentinel, storage.sink.size(part))
    return ShardCheck(committed=not problem, sentinel=None if problem else sentinel, note=problem)


def _read_sentinel(storage: JobStorage, shard: Shard) -> tuple[dict[str, Any] | None, str]:
    """(sentinel, "") for a valid one of this job, (None, why) for one that cannot be
    trusted, (None, "") for none. Raises StaleCheckpointError for another spec or input."""
    path = storage.sentinel_path(shard.shard_id)
    raw = storage.checkpoint.read_bytes(path)
    if raw is None:
        return None, ""
    try:
        sentinel = parse_sentinel(raw, path, shard.shard_id)
    except InvalidSentinel as err:
        return None, str(err)
    spec = storage.spec
    if sentinel["spec_fingerprint"] != spec.fingerprint:
        raise different_spec_error(spec, sentinel.get("fingerprint_inputs", {}), f"{path} was committed by")
    if sentinel["input_fingerprint"] != shard.input_fingerprint:
        raise StaleCheckpointError(
            f"{path} covers input {sentinel['input_fingerprint']}, but the plan now has "
            f"{shard.input_fingerprint}; the input changed. Restore it, or set resume=False to start fresh."
        )
    return sentinel, ""


def _part_problem(part: str, sentinel: dict[str, Any], size: int | None) -> str:
    if size is None:
        return f"{part} is missing"
    if size != sentinel["bytes"]:
        return f"{part} has {size} bytes, its sentinel says {sentinel['bytes']} (truncated or overwritten)"
    return ""


def quarantine(storage: JobStorage, shard_id: str, reason: str) -> str:
    """Move a sentinel that cannot be trusted out of the way, so the shard is recomputed."""
    path = storage.sentinel_path(shard_id)
    raw = storage.checkpoint.read_bytes(path) or b""
    target = storage.quarantine_path(shard_id, int(time.time() * 1000))
    record = json.dumps({"reason": reason, "sentinel": raw.decode("utf-8", "replace")}).encode()
    storage.checkpoint.write_atomic(target, record)
    storage.checkpoint.delete(path)
    note = f"shard {shard_id}: {reason}; sentinel moved to {target}, the shard will be recomputed"
    log.warning("%s", note)
    return note


def commit_shard(
    storage: JobStorage,
    shard: Shard,
    staged: StagedPart | None,
    *,
    rows_in: int,
    rows_out: int,
    lines: int,
    attempt: dict[str, Any],
) -> tuple[bool, dict[str, Any]]:
    """Create the sentinel (the commit point), then publish or discard the staged part.

    Returns (won, sentinel): ``won`` is False when another attempt committed first; the
    returned sentinel is then the winner's. ``staged`` is None for a shard that produced no
    rows: it commits without a part (its sentinel's ``part`` is null).
    """
    spec = storage.spec
    sentinel = {
        "schema_version": SENTINEL_SCHEMA_VERSION,
        "shard_id": shard.shard_id,
        "part": storage.part_name(shard.shard_id) if staged is not None else None,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "lines": lines,
        "bytes": staged.stream.bytes_written if staged is not None else 0,
        "sha256": staged.stream.sha256 if staged is not None else None,
        "input_fingerprint": shard.input_fingerprint,
        "spec_fingerprint": spec.fingerprint,
        "fingerprint_inputs": spec.fingerprint_inputs(),
        "attempt": attempt,
        "staged": staged.handle if staged is not None else None,
        "committed_at": time.time(),
    }
    failpoints.hit("before_sentinel")
    path = storage.sentinel_path(shard.shard_id)
    won = storage.checkpoint.create_exclusive(path, json.dumps(sentinel, sort_keys=True).encode())
    if not won:
        if staged is not None:
            staged.abort()
        winner = parse_sentinel(storage.checkpoint.read_bytes(path) or b"", path, shard.shard_id)
        return False, winner
    failpoints.hit("before_publish")
    if staged is not None:
        staged.publish()
    return True, sentinel
