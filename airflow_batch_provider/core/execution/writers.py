"""Write a shard's output batches into its (staged) part file, in Parquet or JSONL."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_batch_provider.core.errors import PredictorOutputError


class PartWriter:
    """Streams Arrow tables into one part; every table must fit the first one's schema."""

    def __init__(self, stream: Any, sink_format: str):
        self._stream = stream
        self._format = sink_format
        self._parquet: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        elif not table.schema.equals(self.schema):
            table = self._cast(table)
        self.rows += table.num_rows
        if self._format == "parquet":
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self._stream, self.schema)
            if table.num_rows:
                self._parquet.write_table(table)
        elif table.num_rows:
            lines = [json.dumps(row, separators=(",", ":"), ensure_ascii=False, default=jsonable) for row in table.to_pylist()]
            self._stream.write(("\n".join(lines) + "\n").encode())

    def close(self) -> None:
        if self._format == "parquet":
            if self._parquet is None:  # no batch at all: still a valid, empty part
                self._parquet = pq.ParquetWriter(self._stream, self.schema or pa.schema([]))
            self._parquet.close()

    def _cast(self, table: pa.Table) -> pa.Table:
        assert self.schema is not None
        if sorted(table.column_names) != sorted(self.schema.names):
            raise PredictorOutputError(
                f"the predictor returned columns {table.column_names} after earlier batches had "
                f"{self.schema.names}; every batch must have the same columns"
            )
        table = table.select(self.schema.names)
        for field in self.schema:
            column = table.column(field.name)
            if column.type == field.type:
                continue
            try:
                column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
                raise PredictorOutputError(
                    f"the predictor's output column {field.name!r} is {column.type} in this batch, {field.type} in "
                    f"earlier ones ({err}); return the same type in every batch"
                ) from None
        return table.cast(self.schema)


def jsonable(value: Any) -> Any:
    """JSON for what ``json`` cannot write itself (bytes, dates, decimals...)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return str(value)
