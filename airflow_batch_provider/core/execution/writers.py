"""Write a shard's output batches into its (staged) part file, in Parquet or JSONL.

Parquet parts are written in row groups of many predictor batches: pyarrow's writer closes a
row group at every ``write_table``, so writing each batch as it comes would leave a part of
250,000 rows and ``batch_size=64`` with about 3,900 row groups and a footer near 1 MB, which
every reader of the sink then pays for. Batches are buffered until ``tunables.ROW_GROUP_ROWS``
rows or ``tunables.ROW_GROUP_BYTES`` bytes of Arrow memory are held (whichever comes first), so the
buffer's memory stays bounded whatever the row width (an embedding of 1,024 floats is 4 KiB a
row). Row groups are not made larger than that: a row group is written in the writer thread
while the next batches are read, and one held until the shard ends would be written after
its last read, with nothing left to overlap it.
"""

from __future__ import annotations

import contextlib
import decimal
import json
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_batch_provider.core.domain.schema.arrow_types import Incompatible, unify_fields
from airflow_batch_provider.core.domain.schema.conform import OUTPUT_FIX, RowOrigin, conform_table
from airflow_batch_provider.core.tunables import ROW_GROUP_BYTES, ROW_GROUP_ROWS


class OutputSchemaWidened(Exception):
    """A column this part already wrote as type null (in a Parquet row group) took a type: the
    part cannot hold both, so the shard is written again from its start with the widened
    schema (it is not committed yet; see ``ShardRunner``)."""

    def __init__(self, columns: list[str]):
        super().__init__(f"output column(s) {columns} were widened from type null after this part wrote them as null")
        self.columns = columns


class PartWriter:
    """Streams Arrow tables into one part, each conformed to the job's output schema.

    ``schema`` is that schema when it is known (declared, or recorded by an earlier shard);
    otherwise batches are held until a row group's worth (or the part's end) and
    ``settle(their_unified_schema)`` is asked for it (it records the schema create-only and
    returns the winner of any race). Every batch is conformed to
    it losslessly (``conform.conform_table``), so every part of a job has one schema.

    A column of type null in that schema is widened (``widen(table_schema)`` records the type
    and returns the job's schema) by the first batch holding a value in it. Before this part's
    first Parquet row group is written, the part simply takes the type; after, the part has
    that column as null already and :class:`OutputSchemaWidened` is raised.
    """

    def __init__(
        self,
        stream: Any,
        sink_format: str,
        schema: pa.Schema | None = None,
        settle: Callable[[pa.Schema], pa.Schema] | None = None,
        widen: Callable[[pa.Schema], pa.Schema] | None = None,
        *,
        row_group_rows: int = ROW_GROUP_ROWS,
        row_group_bytes: int = ROW_GROUP_BYTES,
    ):
        self._stream = stream
        self._format = sink_format
        self._parquet: pq.ParquetWriter | None = None
        self._settle = settle
        self._widen = widen
        self._row_group_rows = row_group_rows
        self._row_group_bytes = row_group_bytes
        self._buffered: list[pa.Table] = []
        self._buffered_rows = self._buffered_bytes = 0
        self._unsettled: list[tuple[pa.Table, RowOrigin]] = []  # batches held until the schema is settled
        self._unsettled_rows = self._unsettled_bytes = 0
        self.schema = schema
        self.rows = 0
        #: the schema of the Parquet file, once its first row group is written
        self.written_schema: pa.Schema | None = None

    def write(self, table: pa.Table, origin: RowOrigin | None = None) -> None:
        if not table.num_rows:
            return
        origin = origin or RowOrigin("(predictor output)", 0, "row")
        if self.schema is None:
            # The output schema is settled from the first row group's worth of batches, not the
            # first batch: a column null in the first batch (a sparse field) would otherwise be
            # recorded as type null and fail every later batch that holds a value.
            self._unsettled.append((table, origin))
            self._unsettled_rows += table.num_rows
            self._unsettled_bytes += table.nbytes
            if self._unsettled_rows >= self._row_group_rows or self._unsettled_bytes >= self._row_group_bytes:
                self._settle_schema()
            return
        self._write_conformed(table, origin)

    def _settle_schema(self) -> None:
        """Settle the schema from the batches held so far (their types unified, a null-only
        column taking another batch's type), then write them."""
        if not self._unsettled:
            return
        first = self._unsettled[0][0].schema
        try:
            fields = list(first)
            for table, _origin in self._unsettled[1:]:
                fields = unify_fields(fields, list(table.schema))
            seen = pa.schema(fields)
        except Incompatible:
            seen = first  # conforming the later batches names the row and column that differ
        self.schema = self._settle(seen) if self._settle else seen
        held, self._unsettled = self._unsettled, []
        self._unsettled_rows = self._unsettled_bytes = 0
        for table, origin in held:
            self._write_conformed(table, origin)

    def _widen_for(self, table: pa.Table) -> None:
        """Widen the columns of type null in which ``table`` holds values (see the class)."""
        assert self.schema is not None
        open_columns = [
            f.name for f in self.schema
            if pa.types.is_null(f.type) and f.name in table.column_names and table.column(f.name).null_count < table.num_rows
        ]
        if not open_columns or self._widen is None:
            return
        widened = self._widen(pa.schema([table.schema.field(n) for n in open_columns]))
        changed = [n for n in open_columns if not pa.types.is_null(widened.field(n).type)]
        if not changed:
            return
        if self.written_schema is not None and any(pa.types.is_null(self.written_schema.field(n).type) for n in changed):
            raise OutputSchemaWidened(changed)
        # Only the columns this table widened: another column widened by another shard stays
        # null in this part (its sentinel says so, and finalize re-types it).
        self.schema = pa.schema([widened.field(f.name) if f.name in changed else f for f in self.schema])
        self._buffered = [t.cast(self.schema) for t in self._buffered]  # null -> T: no value changes

    @property
    def null_columns(self) -> list[str]:
        """Columns the Parquet part holds as type null (finalize re-types them if they widen)."""
        schema = self.written_schema if self._format == "parquet" else None
        return [f.name for f in schema if pa.types.is_null(f.type)] if schema is not None else []

    def _write_conformed(self, table: pa.Table, origin: RowOrigin) -> None:
        self._widen_for(table)
        table = conform_table(table, self.schema, origin, fix=OUTPUT_FIX, what="the job's output schema")
        self.rows += table.num_rows
        if self._format == "parquet":
            self._buffered.append(table)
            self._buffered_rows += table.num_rows
            self._buffered_bytes += table.nbytes
            if self._buffered_rows >= self._row_group_rows or self._buffered_bytes >= self._row_group_bytes:
                self._write_row_group()
        else:
            lines = [json.dumps(row, separators=(",", ":"), ensure_ascii=False, default=jsonable) for row in table.to_pylist()]
            self._stream.write(("\n".join(lines) + "\n").encode())

    def _write_row_group(self) -> None:
        """The buffered batches as one row group (Arrow splits one above 1,048,576 rows)."""
        if not self._buffered:
            return
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self._stream, self.schema)
            self.written_schema = self.schema
        self._parquet.write_table(pa.concat_tables(self._buffered))
        self._buffered.clear()
        self._buffered_rows = self._buffered_bytes = 0

    def discard(self) -> None:
        """Close the Parquet writer of a part being thrown away (its stream is aborted next)."""
        if self._parquet is not None:
            with contextlib.suppress(Exception):
                self._parquet.close()
            self._parquet = None

    def close(self) -> None:
        """Write what is buffered and the Parquet footer; the part is whole only after this."""
        self._settle_schema()
        self._write_row_group()
        if self._parquet is not None:
            self._parquet.close()


def jsonable(value: Any) -> Any:
    """JSON for what ``json`` cannot write itself (bytes, dates, decimals...)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if isinstance(value, decimal.Decimal) and value == value.to_integral_value():
        return int(value)  # decimal128(20, 0) holds int64 and uint64 values alike: a JSON integer
    return str(value)
