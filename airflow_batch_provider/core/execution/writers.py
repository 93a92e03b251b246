"""Write a shard's output batches into its (staged) part file, in Parquet or JSONL."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_batch_provider.core.errors import PredictorError


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
            lines = [json.dumps(row, separators=(",", ":"), ensure_ascii=False, default=_jsonable) for row in table.to_pylist()]
            self._stream.write(("\n".join(lines) + "\n").encode())

    def close(self) -> None:
        if self._format == "parquet":
            if self._parquet is None:  # no batch at all: still a valid, empty part
                self._parquet = pq.ParquetWriter(self._stream, self.schema or pa.schema([]))
            self._parquet.close()

    def _cast(self, table: pa.Table) -> pa.Table:
        assert self.schema is not None
        if sorted(table.column_names) != sorted(self.schema.names):
            raise PredictorError(
                f"the predictor returned columns {table.column_names} after earlier batches had "
                f"{self.schema.names}; every batch must have the same columns"
            )
        try:
            return table.select(self.schema.names).cast(self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
            raise PredictorError(
                f"the predictor returned types {table.schema} that do not match earlier batches "
                f"{self.schema} ({err}); return the same types in every batch"
            ) from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return str(value)
