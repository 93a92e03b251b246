"""The job's schemas in the checkpoint: the input schema the plan settled, and the output schema.

The input schema is written beside the plan (a small file each shard reads, instead of the
whole plan). The output schema is declared, or recorded create-only by the first shard that
produces rows.

Every later shard conforms its output to it (losslessly, see ``schemas.conform_table``), so every
part of the sink has the same schema whatever order the shards committed in. Recording is a
create-only write: two shards racing to record get one winner, and the loser conforms to it.
"""

from __future__ import annotations

import json

import pyarrow as pa

from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.schemas import declared_schema, schema_from_json, schema_to_json


def write_input_schema(storage: JobStorage, schema_json: dict) -> None:
    storage.checkpoint.write_atomic(storage.input_schema_path, json.dumps(schema_json).encode())


def load_input_schema(storage: JobStorage) -> pa.Schema | None:
    """The input schema of the current plan (None for a plan written before schemas were settled)."""
    raw = storage.checkpoint.read_bytes(storage.input_schema_path)
    return None if raw is None else schema_from_json(json.loads(raw))


def known_output_schema(storage: JobStorage) -> pa.Schema | None:
    """The declared ``output_schema``, else the recorded one, else None (no shard produced rows yet)."""
    if storage.spec.output_schema is not None:
        return declared_schema("output_schema", storage.spec.output_schema)
    raw = storage.checkpoint.read_bytes(storage.output_schema_path)
    return None if raw is None else schema_from_json(json.loads(raw))


def record_output_schema(storage: JobStorage, schema: pa.Schema, input_schema: pa.Schema | None) -> pa.Schema:
    """Record ``schema`` (a first output batch's) unless another shard did first; return the winner.

    A column of the same name as an input column takes the input's type where the batch
    format only blurred it: null-typed (all null in that batch), a list where the input had
    a fixed-size list of the same items (pandas), a decimal of another precision."""
    if input_schema is not None:
        schema = pa.schema([
            pa.field(f.name, input_schema.field(f.name).type) if f.name in input_schema.names and _blurred(input_schema.field(f.name).type, f.type) else f
            for f in schema
        ])
    created = storage.checkpoint.create_exclusive(storage.output_schema_path, json.dumps(schema_to_json(schema)).encode())
    if created:
        return schema
    return known_output_schema(storage) or schema


def _blurred(original: pa.DataType, seen: pa.DataType) -> bool:
    if pa.types.is_null(seen):
        return True
    if pa.types.is_fixed_size_list(original) and pa.types.is_list(seen):
        return original.value_type.equals(seen.value_type)
    if pa.types.is_decimal(original) and pa.types.is_decimal(seen):
        return original.scale == seen.scale and original.precision >= seen.precision
    return False
