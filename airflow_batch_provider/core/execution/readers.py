"""Stream one shard's rows as Arrow tables of at most ``batch_size`` rows.

Parquet is read row group by row group (``ParquetFile.iter_batches``); JSONL is read from
the shard's byte range in blocks cut at line ends and parsed by Arrow's C++ JSON reader.
Nothing here holds more than one block of input in memory.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

from airflow_batch_provider.core.domain.planning import Shard
from airflow_batch_provider.core.errors import InputDataError
from airflow_batch_provider.core.spec import BatchSpec
from airflow_batch_provider.core.stores import Store

JSONL_BLOCK_BYTES = 8 << 20


@dataclass
class ReadStats:
    rows: int = 0  # rows parsed
    lines: int = 0  # physical lines consumed (JSONL; blank lines are not rows)


def read_shard(store: Store, spec: BatchSpec, shard: Shard, stats: ReadStats) -> Iterator[pa.Table]:
    if shard.unit == "row_groups":
        tables = _read_parquet(store, spec, shard)
    else:
        tables = _read_jsonl(store, spec, shard, stats)
    for table in tables:
        stats.rows += table.num_rows
        yield from _rebatch(table, spec.batch_size)


def _rebatch(table: pa.Table, size: int) -> Iterator[pa.Table]:
    for offset in range(0, table.num_rows, size):
        yield table.slice(offset, size)


def _read_parquet(store: Store, spec: BatchSpec, shard: Shard) -> Iterator[pa.Table]:
    with store.open_read(shard.path) as handle:
        try:
            parquet = pq.ParquetFile(handle)
            batches = parquet.iter_batches(
                batch_size=spec.batch_size,
                row_groups=list(range(shard.start, shard.end)),
                columns=list(spec.columns) if spec.columns else None,
            )
            for batch in batches:
                yield pa.Table.from_batches([batch])
        except (pa.ArrowInvalid, OSError) as err:
            raise InputDataError(
                f"{shard.path}: cannot read row groups {shard.start}-{shard.end} ({err}); "
                "the file may have changed or be truncated since it was planned"
            ) from None


def _read_jsonl(store: Store, spec: BatchSpec, shard: Shard, stats: ReadStats) -> Iterator[pa.Table]:
    assert shard.byte_start is not None and shard.byte_end is not None
    schema: pa.Schema | None = None
    line = shard.start
    with store.open_read(shard.path) as handle:
        handle.seek(shard.byte_start)
        remaining = shard.byte_end - shard.byte_start
        carry = b""
        while remaining > 0 or carry:
            chunk = handle.read(min(JSONL_BLOCK_BYTES, remaining)) if remaining > 0 else b""
            remaining -= len(chunk)
            if remaining > 0 and chunk:
                cut = chunk.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a block: keep reading
                    carry += chunk
                    continue
                block, carry = carry + chunk[:cut], chunk[cut:]
            else:
                if not chunk and remaining > 0:
                    raise InputDataError(
                        f"{shard.path}: ended before byte {shard.byte_end}; the file changed since it was planned"
                    )
                block, carry = carry + chunk, b""
            if not block:
                break
            block_lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
            table = _parse_block(block, shard.path, line)
            if spec.columns:
                table = _select_columns(table, spec.columns, shard.path, line)
            schema, table = _conform(schema, table, shard.path, line)
            stats.lines += block_lines
            line += block_lines
            if table.num_rows:
                yield table
    if stats.lines != shard.rows:
        raise InputDataError(
            f"{shard.path}: lines {shard.start}-{shard.end} hold {stats.lines} lines now, "
            f"{shard.rows} when planned; the file changed since it was planned"
        )


def _parse_block(block: bytes, path: str, first_line: int) -> pa.Table:
    try:
        return pj.read_json(io.BytesIO(block), read_options=pj.ReadOptions(block_size=len(block) + 1))
    except pa.ArrowInvalid as err:
        for offset, text in enumerate(block.split(b"\n")):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except ValueError as line_err:
                raise InputDataError(
                    f"{path}: line {first_line + offset + 1} is not valid JSON ({line_err}); "
                    "fix or remove that line and run again"
                ) from None
            if not isinstance(value, dict):
                raise InputDataError(
                    f"{path}: line {first_line + offset + 1} is a JSON {type(value).__name__}, "
                    "not an object; each JSONL line must be one object"
                ) from None
        last_line = first_line + block.count(b"\n") + 1
        raise InputDataError(
            f"{path}: lines {first_line + 1}-{last_line} cannot be read as one "
            f"table ({err}); a field probably changes type between rows"
        ) from None


def _select_columns(table: pa.Table, columns: tuple[str, ...], path: str, first_line: int) -> pa.Table:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputDataError(
            f"{path}: no row in lines from {first_line + 1} has column(s) {missing} "
            f"(present: {table.column_names}); fix BatchSpec.columns or the input"
        )
    return table.select(list(columns))


def _conform(schema: pa.Schema | None, table: pa.Table, path: str, first_line: int) -> tuple[pa.Schema, pa.Table]:
    """Keep one schema per shard: later blocks are cast to the first block's types."""
    if schema is None or table.schema.equals(schema):
        return table.schema, table
    try:
        unified = pa.unify_schemas([schema, table.schema], promote_options="permissive")
        return unified, table.cast(pa.schema([unified.field(n) for n in table.column_names]))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        raise InputDataError(
            f"{path}: rows from line {first_line + 1} have types that do not match earlier rows ({err})"
        ) from None
