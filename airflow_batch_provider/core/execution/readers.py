"""Stream one shard's rows as Arrow tables of at most ``batch_size`` rows, each with where
its rows came from.

Parquet is read row group by row group (``ParquetFile.iter_batches``); JSONL is read from
the shard's byte range in blocks cut at line ends and parsed by Arrow's C++ JSON reader. A
block Arrow refuses is parsed again line by line, only to find its bad lines: each goes to
the shard's bad-row policy (``badrows.py``), the rest are parsed by Arrow. Nothing here holds
more than one block of input in memory.

The file is read pinned to the version the plan recorded (``Store.read_pinned``): a file gone
or changed since fails the shard before anything is committed.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

from airflow_batch_provider.core.domain.planning import Shard
from airflow_batch_provider.core.errors import BatchError, InputChangedError, InputDataError, InputEncodingError
from airflow_batch_provider.core.execution.badrows import BadRows, FailOnBadRow
from airflow_batch_provider.core.spec import BatchSpec
from airflow_batch_provider.core.stores import Store

JSONL_BLOCK_BYTES = 8 << 20
_BOM = b"\xef\xbb\xbf"


@dataclass
class ReadStats:
    rows: int = 0  # rows read, rejected ones included
    lines: int = 0  # physical lines consumed (JSONL; blank lines are not rows)


@dataclass
class Batch:
    """Rows for one predictor call, and where each came from: ``positions`` holds 1-based
    line numbers (JSONL) or 0-based row indexes in the file (Parquet)."""

    table: pa.Table
    positions: np.ndarray

    def slice(self, start: int, stop: int) -> Batch:
        return Batch(self.table.slice(start, stop - start), self.positions[start:stop])

    def where(self, shard: Shard) -> str:
        """The batch's rows in words, for messages: ``lines 3-9`` or ``rows 0-63``."""
        unit = "line" if shard.unit == "lines" else "row"
        if not len(self.positions):
            return f"no {unit}s"
        first, last = int(self.positions[0]), int(self.positions[-1])
        return f"{unit} {first}" if first == last else f"{unit}s {first}-{last}"


def read_shard(
    store: Store, spec: BatchSpec, shard: Shard, stats: ReadStats, bad: BadRows | FailOnBadRow | None = None
) -> Iterator[Batch]:
    """The shard's rows in batches of at most ``batch_size``; rows that cannot be read go to
    ``bad`` (the shard's bad-row policy; default: fail at the first)."""
    bad = bad or FailOnBadRow()
    if shard.unit == "row_groups":
        batches = _read_parquet(store, spec, shard, bad)
    else:
        batches = _read_jsonl(store, spec, shard, stats, bad)
    for batch in batches:
        stats.rows += batch.table.num_rows
        for offset in range(0, batch.table.num_rows, spec.batch_size):
            yield batch.slice(offset, min(offset + spec.batch_size, batch.table.num_rows))


# -- Parquet ------------------------------------------------------------------------------
def _read_parquet(store: Store, spec: BatchSpec, shard: Shard, bad: BadRows | FailOnBadRow) -> Iterator[Batch]:
    with store.read_pinned(shard.path, shard.version) as handle:
        try:
            parquet = pq.ParquetFile(handle)
            position = sum(parquet.metadata.row_group(i).num_rows for i in range(shard.start))
            batches = parquet.iter_batches(
                batch_size=spec.batch_size,
                row_groups=list(range(shard.start, shard.end)),
                columns=list(spec.columns) if spec.columns else None,
            )
            for record_batch in batches:
                table = pa.Table.from_batches([record_batch])
                positions = np.arange(position, position + table.num_rows)
                position += table.num_rows
                yield _drop_invalid_utf8(Batch(table, positions), shard, bad)
        except (pa.ArrowInvalid, OSError) as err:
            if isinstance(err, BatchError):
                raise
            raise InputDataError(
                f"{shard.path}: cannot read row groups {shard.start}-{shard.end} ({err}); "
                "the file may have changed or be truncated since it was planned"
            ) from None


def _drop_invalid_utf8(batch: Batch, shard: Shard, bad: BadRows | FailOnBadRow) -> Batch:
    """Parquet does not check that string columns hold UTF-8; Python readers of the batch would
    fail far from here. Find such rows (a full validation first: cheap when all is well)."""
    try:
        batch.table.validate(full=True)
        return batch
    except pa.ArrowInvalid:
        pass
    keep = np.ones(batch.table.num_rows, dtype=bool)
    for name in batch.table.column_names:
        column = batch.table.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        raw = column.cast(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()).to_pylist()
        for index, value in enumerate(raw):
            if value is None or not keep[index]:
                continue
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as err:
                keep[index] = False
                position = int(batch.positions[index])
                row = {n: (raw_value if n != name else value) for n, raw_value in _row_as_bytes(batch.table, index).items()}
                bad.reject(
                    InputEncodingError(
                        f"{shard.path}: row {position}, column {name!r} is not valid UTF-8 ({err.reason} at byte "
                        f"{err.start}); rewrite the file with UTF-8 strings (or that column as binary)"
                    ),
                    position,
                    row=row,
                )
    indexes = np.flatnonzero(keep)
    return Batch(batch.table.take(pa.array(indexes)), batch.positions[indexes])


def _row_as_bytes(table: pa.Table, index: int) -> dict:
    """One row's values, with string columns as raw bytes (safe when they are not UTF-8)."""
    values = {}
    for name in table.column_names:
        column = table.column(name).slice(index, 1)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            column = column.cast(pa.large_binary())
        values[name] = column.to_pylist()[0]
    return values


# -- JSONL --------------------------------------------------------------------------------
def _read_jsonl(store: Store, spec: BatchSpec, shard: Shard, stats: ReadStats, bad: BadRows | FailOnBadRow) -> Iterator[Batch]:
    assert shard.byte_start is not None and shard.byte_end is not None
    schema: pa.Schema | None = None
    line = shard.start
    with store.read_pinned(shard.path, shard.version) as handle:
        handle.seek(shard.byte_start)
        remaining = shard.byte_end - shard.byte_start
        carry = b""
        at_file_start = shard.byte_start == 0
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
                    raise InputChangedError(
                        f"{shard.path}: ended before byte {shard.byte_end}; the file changed since it was "
                        "planned. Clear the plan task (or trigger a new run) to plan the new version."
                    )
                block, carry = carry + chunk, b""
            if not block:
                break
            if at_file_start and block.startswith(_BOM):
                block = block[len(_BOM) :]  # a UTF-8 byte order mark says nothing about the rows
            at_file_start = False
            block_lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
            table, positions = _parse_block(block, shard.path, line, bad)
            stats.lines += block_lines
            if table.num_rows:
                if spec.columns:
                    table = _select_columns(table, spec.columns, shard.path, line)
                schema, table = _conform(schema, table, shard.path, line)
                yield Batch(table, positions)
            line += block_lines
    if stats.lines != shard.rows:
        raise InputChangedError(
            f"{shard.path}: lines {shard.start}-{shard.end} hold {stats.lines} lines now, "
            f"{shard.rows} when planned; the file changed since it was planned. Clear the plan "
            "task (or trigger a new run) to plan the new version."
        )


def _parse_block(block: bytes, path: str, first_line: int, bad: BadRows | FailOnBadRow) -> tuple[pa.Table, np.ndarray]:
    """The block's rows and their line numbers; bad lines go to the bad-row policy."""
    try:
        table = _arrow_json(block)
        table.validate(full=True)  # Arrow's JSON reader does not check UTF-8 in strings
    except pa.ArrowException:
        table = None
    if table is not None:
        count = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
        if table.num_rows == count:  # every line a row (the usual case): no need to split
            return table, np.arange(first_line + 1, first_line + 1 + count, dtype=np.int64)
        lines = block.split(b"\n")
        positions = np.array([first_line + i + 1 for i, text in enumerate(lines) if text.strip()], dtype=np.int64)
        if len(positions) == table.num_rows:
            return table, positions
    good: list[bytes] = []
    numbers: list[int] = []
    for offset, text in enumerate(block.split(b"\n")):
        if not text.strip():
            continue
        number = first_line + offset + 1
        problem = _line_problem(text, path, number)
        if problem is not None:
            bad.reject(problem, number, raw=text.rstrip(b"\r"))
            continue
        good.append(text)
        numbers.append(number)
    if not good:
        return pa.table({}), np.array([], dtype=np.int64)
    try:
        table = _arrow_json(b"\n".join(good))
    except pa.ArrowException as err:
        raise InputDataError(
            f"{path}: lines {numbers[0]}-{numbers[-1]} cannot be read as one "
            f"table ({err}); a field probably changes type between rows"
        ) from None
    return table, np.array(numbers, dtype=np.int64)


def _arrow_json(data: bytes) -> pa.Table:
    return pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(block_size=len(data) + 1))


def _line_problem(text: bytes, path: str, number: int) -> InputDataError | None:
    """What is wrong with one JSONL line, as the error that names it; None when it is a row."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as err:
        return InputEncodingError(
            f"{path}: line {number} is not valid UTF-8 ({err.reason} at byte {err.start} of the line); "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or set bad_rows='skip' to reject such lines"
        )
    try:
        value = json.loads(decoded, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as err:
        return InputDataError(
            f"{path}: line {number} gives key {err.args[0]!r} twice; which value is meant is unclear, "
            "fix that line (or set bad_rows='skip' to reject such lines)"
        )
    except ValueError as err:
        return InputDataError(
            f"{path}: line {number} is not valid JSON ({err}); fix or remove that line and run again "
            "(or set bad_rows='skip' to reject such lines)"
        )
    if not isinstance(value, dict):
        return InputDataError(
            f"{path}: line {number} is a JSON {type(value).__name__}, not an object; each JSONL line must be one object"
        )
    return None


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


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
