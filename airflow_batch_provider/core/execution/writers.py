"""Write a shard's output batches into its (staged) part file, in Parquet or JSONL."""

from __future__ import annotations

import decimal
import json
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_batch_provider.core.schemas import OUTPUT_FIX, RowOrigin, conform_table


class PartWriter:
    """Streams Arrow tables into one part, each conformed to the job's output schema.

    ``schema`` is that schema when it is known (declared, or recorded by an earlier shard);
    otherwise ``settle(first_batch_schema)`` is asked for it at the first batch (it records
    the schema create-only and returns the winner of any race). Every batch is conformed to
    it losslessly (``schemas.conform_table``), so every part of a job has one schema.
    """

    def __init__(
        self,
        stream: Any,
        sink_format: str,
        schema: pa.Schema | None = None,
        settle: Callable[[pa.Schema], pa.Schema] | None = None,
    ):
        self._stream = stream
        self._format = sink_format
        self._parquet: pq.ParquetWriter | None = None
        self._settle = settle
        self.schema = schema
        self.rows = 0

    def write(self, table: pa.Table, origin: RowOrigin | None = None) -> None:
        if not table.num_rows:
            return
        if self.schema is None:
            self.schema = self._settle(table.schema) if self._settle else table.schema
        table = conform_table(
            table, self.schema, origin or RowOrigin("(predictor output)", 0, "row"), fix=OUTPUT_FIX, what="the job's output schema"
        )
        self.rows += table.num_rows
        if self._format == "parquet":
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self._stream, self.schema)
            self._parquet.write_table(table)
        else:
            lines = [json.dumps(row, separators=(",", ":"), ensure_ascii=False, default=_jsonable) for row in table.to_pylist()]
            self._stream.write(("\n".join(lines) + "\n").encode())

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if isinstance(value, decimal.Decimal) and value == value.to_integral_value():
        return int(value)  # decimal128(20, 0) holds int64 and uint64 values alike: a JSON integer
    return str(value)
