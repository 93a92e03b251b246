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


def test_parquet_types_that_json_writes_as_text_come_back_exactly():
    """Timestamps (with and without a zone), dates and decimals are recorded as text
    (``jsonable``): rebuilt with the job's input schema they are the values that were read."""
    import datetime
    import decimal

    schema = pa.schema([("ts", pa.timestamp("us")), ("tz", pa.timestamp("ms", tz="UTC")), ("d", pa.date32()),
                        ("dec", pa.decimal128(10, 3)), ("big", pa.decimal128(20, 0)), ("ok", pa.bool_()),
                        ("m", pa.struct([("a", pa.int16())])), ("b", pa.binary())])
    original = pa.Table.from_pylist([{
        "ts": datetime.datetime(2026, 1, 2, 3, 4, 5, 6), "tz": datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc),
        "d": datetime.date(2026, 1, 2), "dec": decimal.Decimal("1.250"), "big": decimal.Decimal(2**64 - 1), "ok": True,
        "m": {"a": 3}, "b": b"hi",
    }], schema=schema)
    recorded = json.loads(json.dumps(original.to_pylist()[0], default=jsonable))
    table, why = rebuild_row(recorded, schema)
    assert why == "" and table.equals(original)
