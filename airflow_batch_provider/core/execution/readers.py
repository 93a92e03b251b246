"""Stream one shard's rows as Arrow tables of at most ``batch_size`` rows, each with where
its rows came from, in the job's input schema.

Parquet is read row group by row group (``ParquetFile.iter_batches``); JSONL is read from
the shard's byte range in blocks cut at line ends and parsed by Arrow's C++ JSON reader,
straight into the job's schema. A block Arrow refuses is parsed again line by line, only to
find its bad lines. Every bad row (malformed JSON, invalid UTF-8, a value the job's schema
cannot hold unchanged) goes to the shard's bad-row policy (``badrows.py``): it fails the
shard, or is rejected and the others are kept. Nothing here holds more than one block of
input in memory.

The file is read pinned to the version the plan recorded (``Store.read_pinned``): a file gone
or changed since fails the shard before anything is committed.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from airflow_batch_provider.core.domain.planning import LINES, ROW_GROUPS, Shard
from airflow_batch_provider.core.domain.schema.arrow_types import Incompatible, value_array
from airflow_batch_provider.core.domain.schema.conform import INPUT_FIX, RowOrigin, conform_table
from airflow_batch_provider.core.errors import BatchError, InputChangedError, InputDataError, InputEncodingError
from airflow_batch_provider.core.execution.badrows import BadRows, FailOnBadRow
from airflow_batch_provider.core.spec import JobSpec
from airflow_batch_provider.core.stores import Store
from airflow_batch_provider.core.tunables import JSONL_BLOCK_BYTES

_BOM = b"\xef\xbb\xbf"

Policy = BadRows | FailOnBadRow


@dataclass
class ReadStats:
    rows: int = 0  # rows read and kept (rejected ones are counted by the bad-row policy)
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
        name = shard.position_name
        if not len(self.positions):
            return f"no {name}s"
        first, last = int(self.positions[0]), int(self.positions[-1])
        return f"{name} {first}" if first == last else f"{name}s {first}-{last}"

    def origin(self, shard: Shard) -> RowOrigin:
        """The batch's rows as ``conform.RowOrigin`` (for the output schema's messages)."""
        first = int(self.positions[0]) if len(self.positions) else 0
        gaps = _positions_if_gapped(self.positions) if shard.unit == LINES else None
        return RowOrigin(shard.path, first, shard.position_name, shard.shard_id, gaps)


def _positions_if_gapped(positions: np.ndarray) -> tuple[int, ...] | None:
    """Each row's line for ``RowOrigin``, needed only where blank or rejected lines break the count."""
    if not len(positions) or int(positions[-1]) - int(positions[0]) + 1 == len(positions):
        return None
    return tuple(int(p) for p in positions)


def read_shard(
    store: Store, spec: JobSpec, shard: Shard, stats: ReadStats, schema: pa.Schema, bad: Policy | None = None
) -> Iterator[Batch]:
    """The shard's rows in batches of at most ``batch_size``, each with exactly ``schema`` (the
    plan's input schema). Rows that cannot be read, or whose values that schema cannot hold
    unchanged, go to ``bad`` (default: fail at the first)."""
    bad = bad or FailOnBadRow()
    if shard.unit == ROW_GROUPS:
        batches = _read_parquet(store, spec, shard, schema, bad)
    else:
        batches = _read_jsonl(store, spec, shard, stats, schema, bad)
    for batch in batches:
        stats.rows += batch.table.num_rows
        for offset in range(0, batch.table.num_rows, spec.batch_size):
            yield batch.slice(offset, min(offset + spec.batch_size, batch.table.num_rows))


def _conformed(table: pa.Table, positions: np.ndarray, schema: pa.Schema, origin: RowOrigin, bad: Policy,
               *, declared: bool, raw: list[bytes] | None = None) -> Batch:
    """``table`` in ``schema`` (``conform.conform_table``); rows whose values it cannot hold
    unchanged go to ``bad``, each with the line as it was (``raw``) or its values."""
    rejected: list[int] = []

    def on_bad(rows: list[tuple[int, str, str]]) -> None:
        for offset, _column, message in rows:
            rejected.append(offset)
            row = None if raw is not None else _row_values(table, offset)
            bad.reject(InputDataError(f"{message}. {INPUT_FIX}"), int(positions[offset]),
                       raw=raw[offset] if raw is not None else None, row=row)

    out = conform_table(table, schema, origin, on_bad=on_bad if bad.skipping else None, declared=declared)
    if rejected:
        positions = np.delete(positions, rejected)
    return Batch(out, positions)


def _row_values(table: pa.Table, index: int) -> dict[str, Any]:
    """One row's values, with string columns as raw bytes (safe when they are not UTF-8)."""
    values = {}
    for name in table.column_names:
        column = table.column(name).slice(index, 1)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            column = column.cast(pa.large_binary())
        values[name] = column.to_pylist()[0]
    return values


# -- Parquet ------------------------------------------------------------------------------
def _read_parquet(store: Store, spec: JobSpec, shard: Shard, schema: pa.Schema, bad: Policy) -> Iterator[Batch]:
    with store.read_pinned(shard.path, shard.version) as handle:
        try:
            parquet = pq.ParquetFile(handle)
            row = sum(parquet.metadata.row_group(i).num_rows for i in range(shard.start))
            present = set(parquet.schema_arrow.names)
            wanted = spec.columns or schema.names
            record_batches = parquet.iter_batches(
                batch_size=spec.batch_size,
                row_groups=list(range(shard.start, shard.end)),
                columns=[c for c in wanted if c in present] if wanted else None,
            )
            for record_batch in record_batches:
                table = pa.Table.from_batches([record_batch])
                batch = _drop_invalid_utf8(Batch(table, np.arange(row, row + table.num_rows)), shard, bad)
                row += table.num_rows
                if batch.table.num_rows:
                    origin = RowOrigin(shard.path, int(batch.positions[0]), shard.position_name, shard.shard_id)
                    batch = _conformed(batch.table, batch.positions, schema, origin, bad, declared=spec.input_schema is not None)
                yield batch
        except (pa.ArrowInvalid, OSError) as err:
            if isinstance(err, BatchError):
                raise
            raise InputDataError(
                f"{shard.path}: cannot read row groups {shard.start}-{shard.end} ({err}); "
                "the file may have changed or be truncated since it was planned"
            ) from None


def _drop_invalid_utf8(batch: Batch, shard: Shard, bad: Policy) -> Batch:
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
                bad.reject(
                    InputEncodingError(
                        f"{shard.path}: row {position}, column {name!r} is not valid UTF-8 ({err.reason} at byte "
                        f"{err.start}); rewrite the file with UTF-8 strings (or that column as binary)"
                    ),
                    position,
                    row=_row_values(batch.table, index),
                )
    indexes = np.flatnonzero(keep)
    return Batch(batch.table.take(pa.array(indexes)), batch.positions[indexes])


# -- JSONL --------------------------------------------------------------------------------
def _read_jsonl(store: Store, spec: JobSpec, shard: Shard, stats: ReadStats, schema: pa.Schema, bad: Policy) -> Iterator[Batch]:
    assert shard.byte_start is not None and shard.byte_end is not None
    lines_before = shard.start
    declared = spec.input_schema is not None
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
            batch = _parse_block_as(block, schema, shard, lines_before, bad, declared=declared, selected=bool(spec.columns))
            stats.lines += block_lines
            lines_before += block_lines
            if batch.table.num_rows:
                yield batch
    if stats.lines != shard.rows:
        raise InputChangedError(
            f"{shard.path}: lines {shard.start}-{shard.end} hold {stats.lines} lines now, "
            f"{shard.rows} when planned; the file changed since it was planned. Clear the plan "
            "task (or trigger a new run) to plan the new version."
        )


def _row_lines(block: bytes, lines_before: int, rows: int) -> np.ndarray | None:
    """The line (1-based) of each of the block's ``rows`` rows, when each non-blank line holds
    exactly one JSON object; None otherwise (the block is then read line by line).

    Arrow's row count alone proves nothing: it reads ``{..} {..}`` on one line as two rows,
    a ``null`` line as a row, and an object across two lines as one, so the counts can agree
    while a line is bad (a blank line makes up for an extra row). Here every non-blank line
    must start with ``{`` and end with ``}``: no object then spans lines (``}`` then ``{``
    across a line end is not JSON, Arrow refuses it), each line gives at least one row, and
    rows == non-blank lines leaves exactly one per line."""
    data = np.frombuffer(block, dtype=np.uint8)
    newlines = np.flatnonzero(data == 0x0A)
    starts = np.concatenate(([0], newlines + 1))
    ends = np.concatenate((newlines, [len(data)]))
    if block.endswith(b"\n"):
        starts, ends = starts[:-1], ends[:-1]
    if not len(data) or not len(starts):
        return None if rows else np.array([], dtype=np.int64)
    ends = ends - ((ends > starts) & (data[np.maximum(ends - 1, 0)] == 0x0D))  # CRLF
    one_object = (ends > starts) & (data[np.minimum(starts, len(data) - 1)] == 0x7B) & (data[np.maximum(ends - 1, 0)] == 0x7D)
    for index in np.flatnonzero(~one_object):  # blank lines, and lines with spaces around the object
        text = block[starts[index] : ends[index]].strip()
        if not text:
            continue
        if not (text.startswith(b"{") and text.endswith(b"}")):
            return None
        one_object[index] = True
    lines = np.flatnonzero(one_object)
    if len(lines) != rows:
        return None
    return lines.astype(np.int64) + (lines_before + 1)


def _parse_block_as(
    block: bytes, schema: pa.Schema, shard: Shard, lines_before: int, bad: Policy, *, declared: bool, selected: bool = False
) -> Batch:
    """Parse straight into the job's schema; when Arrow refuses the block, line by line.

    A declared input_schema or ``columns`` (``selected``) selects columns, as Parquet reads
    only those: other keys are not read. An inferred schema of every column must see every
    key, so that a key the sample never showed fails instead of vanishing."""
    only_schema = declared or selected
    options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore" if only_schema else "infer")
    try:
        table = _arrow_json(block, options)
        table.validate(full=True)  # Arrow's JSON reader does not check UTF-8 in strings
    except pa.ArrowException:
        table = None
    positions = None if table is None else _row_lines(block, lines_before, table.num_rows)
    if table is not None and positions is not None and not _may_be_rounded(table, schema):
        origin = RowOrigin(shard.path, lines_before + 1, "line", shard.shard_id, _positions_if_gapped(positions))
        return _conformed(table, positions, schema, origin, bad, declared=declared)
    return _parse_lines_as(block, schema, shard, lines_before, bad, declared=declared, only_schema=only_schema)


def _may_be_rounded(table: pa.Table, schema: pa.Schema) -> bool:
    """Whether a float column holds a whole number of 2^53 or more: Arrow's parser turns an
    integer literal that large into the nearest float without a word, so such a block is read
    again line by line, where the exact integer is seen (a genuine float like 1e20 passes)."""
    for field in schema:
        if pa.types.is_floating(field.type) and field.name in table.column_names:
            column = table.column(field.name)
            big = pc.and_(pc.greater_equal(pc.abs(column), 2.0**53), pc.equal(column, pc.floor(column)))
            if pc.any(big).as_py():
                return True
    return False


def _parse_lines_as(
    block: bytes, schema: pa.Schema, shard: Shard, lines_before: int, bad: Policy, *, declared: bool, only_schema: bool
) -> Batch:
    """The slow path: one row at a time, so that each bad line is named, and rejected with its text."""
    tables, numbers = [], []
    for offset, text in enumerate(block.split(b"\n")):
        if not text.strip():
            continue
        number = lines_before + offset + 1
        raw = text.rstrip(b"\r")
        value, problem = _line_value(text, shard.path, number)
        here = RowOrigin(shard.path, number, "line", shard.shard_id)
        if problem is None and only_schema:
            value = {k: v for k, v in value.items() if k in schema.names}
        if problem is None:
            try:
                row = _row_table(value, here)
            except InputDataError as err:
                row, problem = None, err
        if problem is not None:
            bad.reject(problem, number, raw=raw)
            continue
        batch = _conformed(row, np.array([number]), schema, here, bad, declared=declared, raw=[raw])
        if batch.table.num_rows:
            tables.append(batch.table)
            numbers.append(number)
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return Batch(table, np.array(numbers, dtype=np.int64))


def _row_table(value: dict, origin: RowOrigin) -> pa.Table:
    columns = {}
    for name, item in value.items():
        try:
            columns[name] = value_array(item)
        except Incompatible as err:
            raise InputDataError(
                f"{origin.path}: {origin.where(0)} (shard {origin.shard}): column {name!r}: {err}, which no Arrow "
                "integer type holds exactly. Write it as a JSON string, or declare input_schema with a decimal "
                "type such as decimal128(38, 0)."
            ) from None
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise InputDataError(
                f"{origin.path}: {origin.where(0)} (shard {origin.shard}): column {name!r} holds a value Arrow cannot "
                f"type ({err}); {INPUT_FIX}"
            ) from None
    return pa.table(columns)


def _arrow_json(data: bytes, parse_options: pj.ParseOptions | None = None) -> pa.Table:
    return pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(block_size=len(data) + 1), parse_options=parse_options)


def _line_value(text: bytes, path: str, number: int) -> tuple[Any, InputDataError | None]:
    """One JSONL line's object, or the error that names what is wrong with the line."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, InputEncodingError(
            f"{path}: line {number} is not valid UTF-8 ({err.reason} at byte {err.start} of the line); "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or set bad_rows='skip' to reject such lines"
        )
    try:
        value = json.loads(decoded, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as err:
        return None, InputDataError(
            f"{path}: line {number} gives key {err.args[0]!r} twice; which value is meant is unclear, "
            "fix that line (or set bad_rows='skip' to reject such lines)"
        )
    except ValueError as err:
        return None, InputDataError(
            f"{path}: line {number} is not valid JSON ({err}); fix or remove that line and run again "
            "(or set bad_rows='skip' to reject such lines)"
        )
    if not isinstance(value, dict):
        return None, InputDataError(
            f"{path}: line {number} is a JSON {type(value).__name__}, not an object; each JSONL line must be one object"
        )
    return value, None


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen
