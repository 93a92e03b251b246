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

from airflow_batch_provider.core.planning import Shard
from airflow_batch_provider.core.spec import BatchSpec, describe_fingerprint_change
from airflow_batch_provider.core.storage import StagedPart, Store, store_for
from airflow_batch_provider.exceptions import StaleCheckpointError

log = logging.getLogger(__name__)

SENTINEL_SCHEMA_VERSION = 1
SENTINEL_DIR = "shards"
QUARANTINE_DIR = "quarantine"
MANIFEST_NAME = "_SUCCESS"
PLAN_NAME = "plan.json"


@dataclass
class JobStorage:
    """The stores and paths of one job: its sink and its checkpoint directory."""

    spec: BatchSpec
    source: Store
    sink: Store
    checkpoint: Store

    @classmethod
    def for_spec(cls, spec: BatchSpec, storage_options: dict[str, Any] | None = None) -> JobStorage:
        return cls(
            spec,
            store_for(spec.source, storage_options),
            store_for(spec.sink_root, storage_options),
            store_for(spec.checkpoint_root, storage_options),
        )

    def part_name(self, shard_id: str) -> str:
        return f"part-{shard_id}.{self.spec.part_extension}"

    def part_path(self, shard_id: str) -> str:
        return f"{self.spec.sink_root}/{self.part_name(shard_id)}"

    @property
    def sentinel_dir(self) -> str:
        return f"{self.spec.checkpoint_root}/{SENTINEL_DIR}"

    def sentinel_path(self, shard_id: str) -> str:
        return f"{self.sentinel_dir}/{shard_id}.json"

    @property
    def plan_path(self) -> str:
        return f"{self.spec.checkpoint_root}/{PLAN_NAME}"

    @property
    def manifest_path(self) -> str:
        return f"{self.spec.sink_root}/{MANIFEST_NAME}"

    def committed_ids(self) -> set[str]:
        """Shard ids with a sentinel: one (paginated) listing of the sentinel directory."""
        return {name[: -len(".json")] for name in self.checkpoint.list_files(self.sentinel_dir) if name.endswith(".json")}


@dataclass
class ShardCheck:
    """Outcome of checking one shard's committed state."""

    committed: bool
    sentinel: dict[str, Any] | None = None
    note: str = ""


class InvalidSentinel(Exception):
    """A sentinel that cannot be trusted (corrupt, unknown schema, wrong shard)."""


def new_attempt(**details: Any) -> dict[str, Any]:
    return {"token": uuid.uuid4().hex, **details}


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
    """Is this shard committed, with its part in place? Heals what it safely can.

    Raises StaleCheckpointError when the shard was committed by a different spec.
    """
    path = storage.sentinel_path(shard.shard_id)
    raw = storage.checkpoint.read_bytes(path)
    if raw is None:
        return ShardCheck(committed=False)
    try:
        sentinel = parse_sentinel(raw, path, shard.shard_id)
    except InvalidSentinel as err:
        return ShardCheck(committed=False, note=quarantine(storage, shard.shard_id, str(err)))
    spec = storage.spec
    if sentinel["spec_fingerprint"] != spec.fingerprint:
        changed = describe_fingerprint_change(sentinel.get("fingerprint_inputs", {}), spec.fingerprint_inputs())
        raise StaleCheckpointError(
            f"{path} was committed by a different spec ({changed}). Refusing to mix outputs of two "
            f"specs in {spec.sink_root}: write to a new sink, or set resume=False to delete this "
            "job's earlier output and start fresh."
        )
    if sentinel["input_fingerprint"] != shard.input_fingerprint:
        raise StaleCheckpointError(
            f"{path} covers input {sentinel['input_fingerprint']}, but the plan now has "
            f"{shard.input_fingerprint}; the input changed. Restore it, or set resume=False to start fresh."
        )
    part = storage.part_path(shard.shard_id)
    size = storage.sink.size(part)
    if size is None and sentinel.get("staged"):
        storage.sink.publish(sentinel["staged"])  # roll forward a crash between commit and publish
        size = storage.sink.size(part)
    if size is None:
        return ShardCheck(False, note=quarantine(storage, shard.shard_id, f"{part} is missing"))
    if size != sentinel["bytes"]:
        reason = f"{part} has {size} bytes, its sentinel says {sentinel['bytes']} (truncated or overwritten)"
        return ShardCheck(False, note=quarantine(storage, shard.shard_id, reason))
    return ShardCheck(committed=True, sentinel=sentinel)


def quarantine(storage: JobStorage, shard_id: str, reason: str) -> str:
    """Move a sentinel that cannot be trusted out of the way, so the shard is recomputed."""
    path = storage.sentinel_path(shard_id)
    raw = storage.checkpoint.read_bytes(path) or b""
    target = f"{storage.spec.checkpoint_root}/{QUARANTINE_DIR}/{shard_id}.{int(time.time() * 1000)}.json"
    record = json.dumps({"reason": reason, "sentinel": raw.decode("utf-8", "replace")}).encode()
    storage.checkpoint.write_atomic(target, record)
    storage.checkpoint.delete(path)
    note = f"shard {shard_id}: {reason}; sentinel moved to {target}, the shard will be recomputed"
    log.warning("%s", note)
    return note


def commit_shard(
    storage: JobStorage,
    shard: Shard,
    staged: StagedPart,
    *,
    rows_in: int,
    rows_out: int,
    lines: int,
    attempt: dict[str, Any],
) -> tuple[bool, dict[str, Any]]:
    """Create the sentinel (the commit point), then publish or discard the staged part.

    Returns (won, sentinel): ``won`` is False when another attempt committed first; the
    returned sentinel is then the winner's.
    """
    from airflow_batch_provider.core import failpoints

    spec = storage.spec
    sentinel = {
        "schema_version": SENTINEL_SCHEMA_VERSION,
        "shard_id": shard.shard_id,
        "part": storage.part_name(shard.shard_id),
        "rows_in": rows_in,
        "rows_out": rows_out,
        "lines": lines,
        "bytes": staged.stream.bytes_written,
        "sha256": staged.stream.sha256,
        "input_fingerprint": shard.input_fingerprint,
        "spec_fingerprint": spec.fingerprint,
        "fingerprint_inputs": spec.fingerprint_inputs(),
        "attempt": attempt,
        "staged": staged.handle,
        "committed_at": time.time(),
    }
    failpoints.hit("before_sentinel")
    path = storage.sentinel_path(shard.shard_id)
    won = storage.checkpoint.create_exclusive(path, json.dumps(sentinel, sort_keys=True).encode())
    if not won:
        staged.store.discard(staged.handle)
        winner = parse_sentinel(storage.checkpoint.read_bytes(path) or b"", path, shard.shard_id)
        return False, winner
    failpoints.hit("before_publish")
    storage.sink.publish(staged.handle)
    return True, sentinel
