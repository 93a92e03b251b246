"""Read a local sink back the ways users do, and insist every reader sees the same rows and columns.

A job's sink is one dataset: pyarrow.dataset, pandas and DuckDB must each read all rows and all
columns, whatever order the shards committed in. Each bad-input corpus case ends with
``read_back(sink, fmt)`` and asserts on the table it returns.
"""

from __future__ import annotations

import glob
import os

import pyarrow as pa
import pyarrow.dataset as ds


def _parts(sink: str, fmt: str) -> list[str]:
    suffix = "parquet" if fmt == "parquet" else "jsonl"
    return sorted(glob.glob(os.path.join(sink, f"part-*.{suffix}")))


def read_back(sink: str, fmt: str) -> pa.Table:
    """The sink as pyarrow.dataset reads it, after checking pandas and DuckDB agree on rows and columns."""
    parts = _parts(sink, fmt)
    assert parts, f"no parts in {sink}"
    if fmt == "parquet":
        table = ds.dataset(sink, format="parquet").to_table()
        _agree_pandas(table, _pandas_parquet(sink))
        _agree_duckdb(table, f"read_parquet('{os.path.join(sink, 'part-*.parquet')}', union_by_name=false)")
    else:
        table = ds.dataset(parts, format="json").to_table()
        _agree_pandas(table, _pandas_jsonl(parts))
        _agree_duckdb(table, f"read_json('{os.path.join(sink, 'part-*.jsonl')}', format='newline_delimited')")
    return table


def _pandas_parquet(sink: str):
    import pandas as pd

    return pd.read_parquet(sink)


def _pandas_jsonl(parts: list[str]):
    import pandas as pd

    return pd.concat([pd.read_json(p, lines=True) for p in parts], ignore_index=True)


def _agree_pandas(table: pa.Table, frame) -> None:
    assert len(frame) == table.num_rows, f"pandas read {len(frame)} rows, pyarrow {table.num_rows}"
    assert sorted(frame.columns) == sorted(table.column_names), (
        f"pandas columns {sorted(frame.columns)} != pyarrow {sorted(table.column_names)}"
    )


def _agree_duckdb(table: pa.Table, relation: str) -> None:
    try:
        import duckdb
    except ImportError:  # pragma: no cover - duckdb is a test extra
        return
    con = duckdb.connect()
    try:
        rows = con.execute(f"select count(*) from {relation}").fetchone()[0]
        columns = [d[0] for d in con.execute(f"select * from {relation} limit 0").description]
    finally:
        con.close()
    assert rows == table.num_rows, f"DuckDB read {rows} rows, pyarrow {table.num_rows}"
    assert sorted(columns) == sorted(table.column_names), f"DuckDB columns {sorted(columns)} != {sorted(table.column_names)}"
