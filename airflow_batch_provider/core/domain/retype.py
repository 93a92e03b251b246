"""Finalize's re-typing of parts committed with an output column as type null that the job's
output schema has since typed (a sparse column widened by a later shard; ``schema/output.py``).

Parquet files carry their schema, and pyarrow, pandas and DuckDB read a sink of parts with
``note: null`` and parts with ``note: string`` as one dataset only when every part agrees, so
finalize rewrites such parts before it writes ``_SUCCESS``: it reads each one (row group by row
group, bounded memory), casts the null columns to their type (every value stays null: nothing
changes), and commits the new part through the commit protocol's own steps:

1. the re-typed part is staged (invisible to readers) and made durable;
2. the sentinel is replaced (an atomic write) by one naming the new part's bytes, sha256 and
   staged handle: the commit point. The new part never has the old part's size (a footer note
   is added when it would), so ``check_shard`` tells the two apart by size alone;
3. the staged part is published over the old one (an atomic rename / multipart completion).

A crash before 2 leaves the old commit whole (and a hidden staged file, aborted later as an
orphan); a crash between 2 and 3 leaves a sentinel whose part has another size and a staged
handle, which whoever checks the shard next rolls forward (as for any commit). The model is
never called: the rows are the ones committed, read back from the part.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_batch_provider.core import failpoints
from airflow_batch_provider.core.domain.commit import quarantine
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.domain.planning import Shard
from airflow_batch_provider.core.domain.schema.arrow_types import type_name
from airflow_batch_provider.core.domain.schema.output import widened_columns
from airflow_batch_provider.core.errors import IncompleteJobError
from airflow_batch_provider.core.stores import StagedPart
from airflow_batch_provider.core.tunables import HASH_BLOCK, RETYPE_THREADS

#: the footer note added when a re-typed part would have its old part's size
RETYPED_KEY = b"airflow_batch_provider.retyped"


def retype_parts(storage: JobStorage, shards: list[Shard], sentinels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The sentinels after re-typing every committed part whose null columns the job's output
    schema now types (the rest are returned as they are). Parquet sinks only: JSON carries no
    types, so a JSONL part has nothing to re-type."""
    if storage.spec.sink_format != "parquet":
        return sentinels
    widened = widened_columns(storage)
    if not widened:
        return sentinels

    def one(pair: tuple[Shard, dict[str, Any]]) -> dict[str, Any]:
        shard, sentinel = pair
        if not sentinel or sentinel.get("part") is None:
            return sentinel
        nulls = sentinel.get("null_columns")
        if nulls is None:  # committed before sentinels named them: the part's footer says
            with storage.sink.open_read(storage.part_path(shard.shard_id)) as handle:
                nulls = [f.name for f in pq.read_schema(handle) if pa.types.is_null(f.type)]
        to_type = {name: widened[name] for name in nulls if name in widened}
        return retype_part(storage, shard, sentinel, to_type, nulls) if to_type else sentinel

    with ThreadPoolExecutor(RETYPE_THREADS) as pool:
        return list(pool.map(one, zip(shards, sentinels, strict=True)))


def retype_part(
    storage: JobStorage, shard: Shard, sentinel: dict[str, Any], to_type: dict[str, pa.DataType], nulls: list[str],
) -> dict[str, Any]:
    """Re-type one committed part (see the module); returns its new sentinel."""
    path = storage.part_path(shard.shard_id)
    sentinel_path = storage.sentinel_path(shard.shard_id)
    raw = storage.checkpoint.read_bytes(sentinel_path)
    if raw is None or json.loads(raw) != sentinel:
        raise _changed(storage, shard)
    digest = _sha256(storage, path)
    if digest != sentinel.get("sha256"):
        note = quarantine(storage, shard.shard_id, f"{path} has sha256 {digest}, its sentinel says {sentinel.get('sha256')}")
        raise IncompleteJobError(
            f"{note}. Finalize re-types this part ({sorted(to_type)} were null in it) and will not re-type "
            "data that is not what was committed. Clear the shard's task (or trigger a new run) to compute it again."
        )
    staged = _write_retyped(storage, path, to_type, note=False)
    if staged.stream.bytes_written == sentinel["bytes"]:
        staged.abort()  # a size of its own: an unpublished re-type is then told by size alone
        staged = _write_retyped(storage, path, to_type, note=True)
    staged.finish()
    new = {
        **sentinel,
        "bytes": staged.stream.bytes_written,
        "sha256": staged.stream.sha256,
        "staged": staged.handle,
        "null_columns": [name for name in nulls if name not in to_type],
        "retyped": {
            "columns": {name: type_name(t) for name, t in to_type.items()},
            "from_bytes": sentinel["bytes"],
            "from_sha256": sentinel["sha256"],
            "at": time.time(),
        },
    }
    failpoints.hit("retype_before_sentinel")
    if storage.checkpoint.read_bytes(sentinel_path) != raw:
        staged.abort()
        raise _changed(storage, shard)
    storage.checkpoint.write_atomic(sentinel_path, json.dumps(new, sort_keys=True).encode())
    failpoints.hit("retype_before_publish")
    if not staged.publish():
        raise IncompleteJobError(
            f"shard {shard.description}: its re-typed part was committed, but its staged data is gone, so {path} "
            "could not be published (aborted by a clean-up?). Rerun finalize: it quarantines the sentinel, and "
            "the shard's task computes it again."
        )
    return new


def _write_retyped(storage: JobStorage, path: str, to_type: dict[str, pa.DataType], *, note: bool) -> StagedPart:
    staged = storage.sink.open_staged(path)
    try:
        with storage.sink.open_read(path) as handle:
            source = pq.ParquetFile(handle)
            target = pa.schema([f.with_type(to_type[f.name]) if f.name in to_type else f for f in source.schema_arrow])
            if note:
                target = target.with_metadata({**(target.metadata or {}), RETYPED_KEY: b"1"})
            with pq.ParquetWriter(staged.stream, target) as writer:
                for index in range(source.num_row_groups):
                    writer.write_table(source.read_row_group(index).cast(target))  # null -> T: every value stays null
    except BaseException:
        staged.abort()
        raise
    return staged


def _sha256(storage: JobStorage, path: str) -> str:
    digest = hashlib.sha256()
    with storage.sink.open_read(path) as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _changed(storage: JobStorage, shard: Shard) -> IncompleteJobError:
    return IncompleteJobError(
        f"shard {shard.description}: its sentinel {storage.sentinel_path(shard.shard_id)} changed while finalize "
        "re-typed its part (another run checked or reset it); nothing was replaced. Rerun finalize."
    )
