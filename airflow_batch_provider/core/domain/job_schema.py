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

    A column the first batch left null-typed takes the input column's type of the same name
    (a pass-through column that happened to be all null in that batch)."""
    if input_schema is not None:
        schema = pa.schema([
            pa.field(f.name, input_schema.field(f.name).type) if pa.types.is_null(f.type) and f.name in input_schema.names else f
            for f in schema
        ])
    created = storage.checkpoint.create_exclusive(storage.output_schema_path, json.dumps(schema_to_json(schema)).encode())
    if created:
        return schema
    return known_output_schema(storage) or schema
