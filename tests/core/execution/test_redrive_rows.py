"""Rows of a re-drive, rebuilt from rejected records with the job's input schema."""

from __future__ import annotations

import json

import pyarrow as pa

from airflow_batch_provider.core.execution.redrive_rows import rebuild_row
from airflow_batch_provider.core.execution.writers import jsonable


def test_rebuilt_rows_keep_their_arrow_types():
    schema = pa.schema([("id", pa.int64()), ("f", pa.float32()), ("big", pa.uint64()), ("ts", pa.timestamp("us")),
                        ("tags", pa.list_(pa.string())), ("vec", pa.list_(pa.float32(), 2)), ("n", pa.int32())])
    original = pa.Table.from_pylist([{"id": 2**62, "f": 0.1, "big": 2**64 - 1, "ts": None, "tags": ["a", None],
                                      "vec": [0.5, 0.25], "n": None}], schema=schema)
    recorded = json.loads(json.dumps(original.to_pylist()[0], default=jsonable))
    table, why = rebuild_row(recorded, schema)
    assert why == "" and table.equals(original)
    table, why = rebuild_row({**recorded, "f": float("nan")}, schema)
    assert table is None and "'f'" in why
    table, why = rebuild_row({"id": 1}, schema)
    assert table is None and "columns" in why
    binary = pa.schema([("b", pa.binary())])
    table, why = rebuild_row({"b": "\\xff"}, binary)  # how a non-UTF-8 byte was recorded: not guessed back
    assert table is None and "binary" in why
