"""The rows of a re-drive unit, rebuilt from the rejected records it computes again.

A record of a row the predictor raised on holds the row's values as read (``row``), in JSON.
JSON drops the Arrow types, so each row is rebuilt with the job's input schema (the one every
batch of the job has) and then written back to JSON and compared with the record: a row whose
values do not come back exactly (a float NaN, bytes that are not UTF-8, a type JSON cannot
tell apart) is not guessed at but carried, as it is, into the unit's new rejected file, with
the reason. Records of rows that could not be read are carried too (``redrive.is_redrivable``).
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from airflow_batch_provider.core.domain.planning import LINES, Shard
from airflow_batch_provider.core.domain.redrive import is_redrivable
from airflow_batch_provider.core.execution.readers import Batch
from airflow_batch_provider.core.execution.writers import jsonable


def redrive_batches(records: list[dict[str, Any]], schema: pa.Schema, unit: Shard, batch_size: int, bad: Any) -> Iterator[Batch]:
    """Batches of at most ``batch_size`` rebuilt rows, positioned at their original line or row
    index; every other record goes to ``bad.carry``."""
    key = "line" if unit.unit == LINES else "row_index"
    tables, positions = [], []
    for record in records:
        if not is_redrivable(record):
            bad.carry(record)
            continue
        table, why = rebuild_row(record["row"], schema)
        if table is None:
            bad.carry({**record, "redrive_error": why})
            continue
        tables.append(table)
        positions.append(int(record.get(key, 0)))
    if not tables:
        return
    table = pa.concat_tables(tables).combine_chunks()
    where = np.asarray(positions, dtype=np.int64)
    for offset in range(0, table.num_rows, batch_size):
        stop = min(offset + batch_size, table.num_rows)
        yield Batch(table.slice(offset, stop - offset), where[offset:stop])


def rebuild_row(values: dict[str, Any], schema: pa.Schema) -> tuple[pa.Table | None, str]:
    """(one-row table with exactly ``schema``, "") or (None, why it cannot be rebuilt exactly)."""
    if set(values) != set(schema.names):
        return None, f"its columns {sorted(values)} are not the job's input columns {schema.names}"
    arrays = []
    for field in schema:
        value = values[field.name]
        if (pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)) and isinstance(value, str) and "\\" in value:
            return None, f"column {field.name!r} is binary and its recorded text may stand for bytes that were not UTF-8"
        try:
            array = pa.array([value], type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            try:
                array = pa.array([value]).cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError) as err:
                return None, f"column {field.name!r}: {value!r} cannot be read back as {field.type} ({err})"
        arrays.append(array)
    table = pa.Table.from_arrays(arrays, schema=schema)
    back = json.loads(json.dumps(table.to_pylist()[0], default=jsonable))
    if back != values:
        differ = sorted(k for k in values if back.get(k) != values[k])
        return None, f"column(s) {differ} do not read back exactly as recorded from the rejected record"
    return table, ""
