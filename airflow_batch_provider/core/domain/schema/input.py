"""The job's input schema: settled at plan time, before any part is written, and kept
beside the plan for the shards to read.

Parquet files carry their schema in the footer; a JSONL shard's is inferred from a sample of
its first lines (its byte range is in the plan, so that is one small read). The per-file
schemas are unified into one (absent and null-only columns take the type seen elsewhere;
int and float give float64) or, when ``BatchSpec.input_schema`` is declared, that one is
used as it is. Readers then hand every batch to the predictor with exactly this schema.

A JSONL column null in every sampled row stays null-typed; a later value in it does not
fit and fails its shard with a message that says to declare ``input_schema``.

The settled schema is written beside the plan (``JobStorage.input_schema_path``): a small
file each shard reads, instead of the whole plan.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.domain.planning import Shard
from airflow_batch_provider.core.domain.schema.arrow_types import (
    Incompatible,
    declared_schema,
    schema_from_json,
    type_name,
    unify_schemas,
    unify_types,
    value_array,
)
from airflow_batch_provider.core.domain.schema.conform import INPUT_FIX
from airflow_batch_provider.core.errors import BatchSpecError, InputDataError, StaleCheckpointError
from airflow_batch_provider.core.spec import JobSpec
from airflow_batch_provider.core.stores import InputFile, Store
from airflow_batch_provider.core.tunables import SCHEMA_SAMPLE_BYTES, SCHEMA_SAMPLE_LINES, SCHEMA_SAMPLE_THREADS


def write_input_schema(storage: JobStorage, schema_json: dict) -> None:
    storage.checkpoint.write_atomic(storage.input_schema_path, json.dumps(schema_json).encode())


def load_input_schema(storage: JobStorage) -> pa.Schema:
    """The input schema of the current plan. Every plan writes it before the plan itself; a
    plan written before schemas were settled has none, and planning again writes it."""
    raw = storage.checkpoint.read_bytes(storage.input_schema_path)
    if raw is None:
        raise StaleCheckpointError(
            f"{storage.input_schema_path} is missing: the plan was written before the job's input schema was "
            "settled at plan time. Run the plan task again (it keeps every committed shard), then this shard."
        )
    return schema_from_json(json.loads(raw))


def file_schemas(
    store: Store, spec: JobSpec, files: list[InputFile], shards: list[Shard], footers: dict[str, pa.Schema] | None = None
) -> list[pa.Schema]:
    """Each file's schema: its Parquet footer (from ``footers`` when splitting read it already),
    or its JSONL shards' samples unified."""
    footers = footers or {}
    by_file: dict[str, list[Shard]] = {}
    for shard in shards:
        by_file.setdefault(shard.relpath, []).append(shard)

    def one(file: InputFile) -> pa.Schema:
        if spec.source_format == "parquet":
            return footers[file.relpath] if file.relpath in footers else parquet_schema(store, file.path, file.size)
        samples = [(file.path, jsonl_sample_schema(store, s, file.size, spec.columns)) for s in by_file.get(file.relpath, [])]
        return unify_schemas(samples, INPUT_FIX)

    with ThreadPoolExecutor(min(SCHEMA_SAMPLE_THREADS, max(1, len(files)))) as pool:
        return list(pool.map(one, files))


def job_input_schema(spec: JobSpec, named: list[tuple[str, pa.Schema]]) -> pa.Schema:
    """The one input schema of the job: declared, or the unified file schemas."""
    if spec.input_schema is not None:
        schema = declared_schema("input_schema", spec.input_schema)
    else:  # columns not selected are never read: their types need not agree across files
        schema = unify_schemas([(where, _selected(s, spec.columns)) for where, s in named], INPUT_FIX)
    if spec.columns:
        missing = [c for c in spec.columns if c not in schema.names]
        if missing:
            where = "input_schema" if spec.input_schema is not None else f"any input file under {spec.source!r}"
            raise BatchSpecError(f"columns {missing} are not in {where} (columns there: {schema.names}); fix BatchSpec.columns")
        schema = pa.schema([schema.field(c) for c in spec.columns])
    return schema


def _selected(schema: pa.Schema, columns: tuple[str, ...] | None) -> pa.Schema:
    """``schema`` cut to ``columns`` (those present, in the file's order); all of it without."""
    return schema if not columns else pa.schema([f for f in schema if f.name in columns])


def parquet_schema(store: Store, path: str, size: int | None = None) -> pa.Schema:
    try:
        with store.open_read(path, size) as handle:
            return pq.ParquetFile(handle).schema_arrow
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError flavours
        raise InputDataError(f"{path}: not a readable Parquet file ({err})") from None


def jsonl_sample_schema(
    store: Store, shard: Shard, file_size: int | None = None, columns: tuple[str, ...] | None = None
) -> pa.Schema:
    """Types of the first lines of one JSONL shard, inferred exactly (big integers included);
    with ``columns``, of those keys only (the reader never reads the others).

    Lines that are not JSON objects are left out here: the reader reports them with their line."""
    assert shard.byte_start is not None and shard.byte_end is not None
    with store.open_read(shard.path, file_size) as handle:
        handle.seek(shard.byte_start)
        block = handle.read(min(SCHEMA_SAMPLE_BYTES, shard.byte_end - shard.byte_start))
    if shard.byte_start + len(block) < shard.byte_end and b"\n" in block:
        block = block[: block.rfind(b"\n")]  # whole lines only
    texts = block.split(b"\n")[:SCHEMA_SAMPLE_LINES]
    fast = _sample_type_at_once(texts)
    if fast is not None:
        return _selected(fast, columns)
    values_of: dict[str, list[tuple[int, Any]]] = {}
    for offset, text in enumerate(texts):  # slow path: per value, naming the line where types part ways
        try:
            row = json.loads(text) if text.strip() else None
        except ValueError:
            continue
        if isinstance(row, dict):
            for key, value in row.items():
                if not columns or key in columns:
                    values_of.setdefault(key, []).append((shard.start + offset + 1, value))
    return pa.schema([(name, _column_type(shard.path, name, values)) for name, values in values_of.items()])


def _sample_type_at_once(texts: list[bytes]) -> pa.Schema | None:
    """The common case in C: one ``json.loads`` of the sample as an array, one Arrow inference
    of the rows as structs (keys unioned). None when some line or value needs the slow path
    (a line that is not an object, mixed types, an integer above 2^63)."""
    try:
        rows = json.loads(b"[" + b",".join(t for t in texts if t.strip()) + b"]")
        if not all(isinstance(row, dict) for row in rows):
            return None
        return pa.schema(list(pa.array(rows).type)) if rows else pa.schema([])
    except (ValueError, pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return None


def _column_type(path: str, name: str, values: list[tuple[int, Any]]) -> pa.DataType:
    seen: pa.DataType = pa.null()
    first = 0
    for line, value in values:  # slow path: name the line where the types part ways
        try:
            value_type = value_array(value).type
            unified = unify_types(seen, value_type)
        except Incompatible as err:
            raise InputDataError(
                f"{path}: line {line}: column {name!r}: {err}; "
                + (f"line {first} holds {type_name(seen)}; no Arrow type holds both without changing values. "
                   if first and "bits" not in str(err) else "")
                + INPUT_FIX
            ) from None
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise InputDataError(f"{path}: line {line}: column {name!r} holds a value Arrow cannot type ({err}). {INPUT_FIX}") from None
        if not first and not pa.types.is_null(value_type):
            first = line
        seen = unified
    return seen
