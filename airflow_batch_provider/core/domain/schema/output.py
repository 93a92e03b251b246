"""The job's output schema: declared, or recorded create-only by the first shard that
produces rows.

Every later shard conforms its output to it (losslessly, see ``conform.conform_table``), so every
part of the sink has the same schema whatever order the shards committed in. Recording is a
create-only write: two shards racing to record get one winner, and the loser conforms to it.

A column recorded as type null (null in every row the first shard settled on: a sparse field)
is *widened* by the first shard that holds a value in it: the column's type is recorded in a
create-only file of its own (``JobStorage.output_widening_path``), so shards racing to widen
one column get one winner too, and a shard whose values that type cannot hold fails naming
both types. Only null -> T is ever recorded; a recorded type never changes. Parts committed
with the column as type null are re-typed by finalize (``domain/retype.py``).
"""

from __future__ import annotations

import json

import pyarrow as pa

from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.domain.schema.arrow_types import declared_schema, schema_from_json, schema_to_json


def known_output_schema(storage: JobStorage) -> pa.Schema | None:
    """The declared ``output_schema``, else the recorded one with its widened columns, else
    None (no shard produced rows yet). One small read, and one per column recorded as null."""
    if storage.spec.output_schema is not None:
        return declared_schema("output_schema", storage.spec.output_schema)
    raw = storage.checkpoint.read_bytes(storage.output_schema_path)
    return None if raw is None else _with_widenings(storage, schema_from_json(json.loads(raw)))


def has_open_columns(schema: pa.Schema | None) -> bool:
    """Whether ``schema`` has columns of type null (a later shard may widen them)."""
    return schema is not None and any(pa.types.is_null(f.type) for f in schema)


def _with_widenings(storage: JobStorage, schema: pa.Schema) -> pa.Schema:
    fields = []
    for field in schema:
        if pa.types.is_null(field.type):
            raw = storage.checkpoint.read_bytes(storage.output_widening_path(field.name))
            if raw is not None:
                field = field.with_type(_widened_type(raw))
        fields.append(field)
    return pa.schema(fields)


def widen_output_schema(storage: JobStorage, current: pa.Schema, seen: pa.Schema, input_schema: pa.Schema | None) -> pa.Schema:
    """``current`` (the job's output schema) with each column of type null that ``seen`` (an
    output table's schema) holds as a type recorded create-only as that type, unless another
    shard recorded one first: the winner's type is returned, and conforming to it either holds
    this shard's values unchanged or fails naming both types. Only null -> T; never T -> other."""
    if storage.spec.output_schema is not None:
        return current  # declared: never widened
    seen = _unblurred(seen, input_schema)
    fields = []
    for field in current:
        if pa.types.is_null(field.type) and field.name in seen.names and not pa.types.is_null(seen.field(field.name).type):
            path = storage.output_widening_path(field.name)
            wanted = seen.field(field.name).type
            record = json.dumps({"column": field.name, "type": schema_to_json(pa.schema([field.with_type(wanted)]))}).encode()
            if storage.checkpoint.create_exclusive(path, record):
                field = field.with_type(wanted)
            else:
                field = field.with_type(_widened_type(storage.checkpoint.read_bytes(path) or record))
        fields.append(field)
    return pa.schema(fields)


def widened_columns(storage: JobStorage) -> dict[str, pa.DataType]:
    """Columns recorded as type null that a later shard gave a type, with that type ({} for a
    declared schema, or when none widened)."""
    if storage.spec.output_schema is not None:
        return {}
    raw = storage.checkpoint.read_bytes(storage.output_schema_path)
    if raw is None:
        return {}
    recorded = schema_from_json(json.loads(raw))
    now = _with_widenings(storage, recorded)
    return {f.name: now.field(f.name).type for f in recorded if pa.types.is_null(f.type) and not pa.types.is_null(now.field(f.name).type)}


def _widened_type(raw: bytes) -> pa.DataType:
    return schema_from_json(json.loads(raw)["type"]).field(0).type


def delete_output_schema(storage: JobStorage) -> None:
    """The recorded output schema and its widenings (a reset: ``resume=False``)."""
    raw = storage.checkpoint.read_bytes(storage.output_schema_path)
    if raw is not None:
        for field in schema_from_json(json.loads(raw)):
            if pa.types.is_null(field.type):
                storage.checkpoint.delete(storage.output_widening_path(field.name))
    storage.checkpoint.delete(storage.output_schema_path)


def record_output_schema(storage: JobStorage, schema: pa.Schema, input_schema: pa.Schema | None) -> pa.Schema:
    """Record ``schema`` (a first output batch's) unless another shard did first; return the winner.

    A column of the same name as an input column takes the input's type where the batch
    format only blurred it: null-typed (all null in that batch), a list where the input had
    a fixed-size list of the same items (pandas), a decimal of another precision."""
    schema = _unblurred(schema, input_schema)
    created = storage.checkpoint.create_exclusive(storage.output_schema_path, json.dumps(schema_to_json(schema)).encode())
    if created:
        return schema
    winner = known_output_schema(storage) or schema
    return widen_output_schema(storage, winner, schema, input_schema) if has_open_columns(winner) else winner


def _unblurred(schema: pa.Schema, input_schema: pa.Schema | None) -> pa.Schema:
    if input_schema is None:
        return schema
    return pa.schema([
        pa.field(f.name, input_schema.field(f.name).type) if f.name in input_schema.names and _blurred(input_schema.field(f.name).type, f.type) else f
        for f in schema
    ])


def _blurred(original: pa.DataType, seen: pa.DataType) -> bool:
    if pa.types.is_null(seen):
        return True
    if pa.types.is_fixed_size_list(original) and pa.types.is_list(seen):
        return original.value_type.equals(seen.value_type)
    if pa.types.is_decimal(original) and pa.types.is_decimal(seen):
        return original.scale == seen.scale and original.precision >= seen.precision
    return False
