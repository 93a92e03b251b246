"""Stream one shard's rows as Arrow tables of at most ``batch_size`` rows.

Parquet is read row group by row group (``ParquetFile.iter_batches``); JSONL is read from
the shard's byte range in blocks cut at line ends and parsed by Arrow's C++ JSON reader.
Nothing here holds more than one block of input in memory.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from airflow_batch_provider.core.domain.planning import Shard
from airflow_batch_provider.core.errors import InputDataError
from airflow_batch_provider.core.schemas import INPUT_FIX, BadRowCallback, Incompatible, RowOrigin, conform_table, value_array
from airflow_batch_provider.core.spec import BatchSpec
from airflow_batch_provider.core.stores import Store

JSONL_BLOCK_BYTES = 8 << 20


@dataclass
class ReadStats:
    rows: int = 0  # rows parsed
    lines: int = 0  # physical lines consumed (JSONL; blank lines are not rows)


def read_shard(
    store: Store, spec: BatchSpec, shard: Shard, stats: ReadStats, schema: pa.Schema | None = None,
    on_bad: BadRowCallback | None = None,
) -> Iterator[pa.Table]:
    """The shard's rows in tables of at most ``batch_size`` rows (see :func:`read_batches`)."""
    for table, _origin in read_batches(store, spec, shard, stats, schema, on_bad):
        yield table


def read_batches(
    store: Store, spec: BatchSpec, shard: Shard, stats: ReadStats, schema: pa.Schema | None = None,
    on_bad: BadRowCallback | None = None,
) -> Iterator[tuple[pa.Table, RowOrigin]]:
    """(table, where its rows come from) per batch. With ``schema`` (the plan's input schema)
    every table has exactly that schema; a value that does not fit it losslessly fails the
    shard (or goes to ``on_bad``, see :func:`conform_table`)."""
    if shard.unit == "row_groups":
        tables = _read_parquet(store, spec, shard, schema, on_bad)
    else:
        tables = _read_jsonl(store, spec, shard, stats, schema, on_bad)
    for table, origin in tables:
        stats.rows += table.num_rows
        for offset in range(0, table.num_rows, spec.batch_size):
            yield table.slice(offset, spec.batch_size), _shifted(origin, offset)


def _shifted(origin: RowOrigin, offset: int) -> RowOrigin:
    if not offset:
        return origin
    if origin.lines is not None:
        return replace(origin, first=origin.lines[offset], lines=origin.lines[offset:])
    return replace(origin, first=origin.first + offset)


def _read_parquet(
    store: Store, spec: BatchSpec, shard: Shard, schema: pa.Schema | None, on_bad: BadRowCallback | None
) -> Iterator[tuple[pa.Table, RowOrigin]]:
    with store.open_read(shard.path) as handle:
        try:
            parquet = pq.ParquetFile(handle)
            row = sum(parquet.metadata.row_group(i).num_rows for i in range(shard.start))
            present = set(parquet.schema_arrow.names)
            wanted = spec.columns or (schema.names if schema is not None else None)
            batches = parquet.iter_batches(
                batch_size=spec.batch_size,
                row_groups=list(range(shard.start, shard.end)),
                columns=[c for c in wanted if c in present] if wanted else None,
            )
            for batch in batches:
                origin = RowOrigin(shard.path, row, "row", shard.shard_id)
                table = pa.Table.from_batches([batch])
                row += table.num_rows
                if schema is not None:
                    table = conform_table(table, schema, origin, on_bad=on_bad, declared=spec.input_schema is not None)
                yield table, origin
        except (pa.ArrowInvalid, OSError) as err:
            raise InputDataError(
                f"{shard.path}: cannot read row groups {shard.start}-{shard.end} ({err}); "
                "the file may have changed or be truncated since it was planned"
            ) from None


def _read_jsonl(
    store: Store, spec: BatchSpec, shard: Shard, stats: ReadStats, job_schema: pa.Schema | None, on_bad: BadRowCallback | None
) -> Iterator[tuple[pa.Table, RowOrigin]]:
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
            origin = RowOrigin(shard.path, line + 1, "line", shard.shard_id)
            if job_schema is not None:
                table, origin = _parse_block_as(block, block_lines, job_schema, origin, on_bad, declared=spec.input_schema is not None)
            else:
                table = _parse_block(block, shard.path, line)
                if spec.columns:
                    table = _select_columns(table, spec.columns, shard.path, line)
                schema, table = _conform(schema, table, shard.path, line)
            stats.lines += block_lines
            line += block_lines
            if table.num_rows:
                yield table, origin
    if stats.lines != shard.rows:
        raise InputDataError(
            f"{shard.path}: lines {shard.start}-{shard.end} hold {stats.lines} lines now, "
            f"{shard.rows} when planned; the file changed since it was planned"
        )


def _row_lines(block: bytes, line: int) -> tuple[int, ...] | None:
    """The line (1-based) of every row of ``block``, where blank lines make it differ from a count."""
    texts = block.split(b"\n")
    if block.endswith(b"\n"):
        texts.pop()
    if all(t.strip() for t in texts):
        return None
    return tuple(line + offset + 1 for offset, text in enumerate(texts) if text.strip())


def _parse_block_as(
    block: bytes, block_lines: int, schema: pa.Schema, origin: RowOrigin, on_bad: BadRowCallback | None, *, declared: bool
) -> tuple[pa.Table, RowOrigin]:
    """Parse straight into the job's schema; when some value does not fit, line by line.
    Returns the rows and their origin (with each row's line when blank lines were skipped)."""
    # a declared input_schema selects columns (as Parquet reads only those); an inferred one
    # must see every key, so that a key the sample never showed fails instead of vanishing
    options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore" if declared else "infer")
    try:
        table = pj.read_json(io.BytesIO(block), read_options=pj.ReadOptions(block_size=len(block) + 1), parse_options=options)
    except pa.ArrowInvalid:
        origin = replace(origin, lines=_row_lines(block, origin.first - 1))
        return _parse_lines_as(block, schema, origin, on_bad, declared=declared), origin
    if table.num_rows != block_lines:  # blank lines: rows and lines part ways
        origin = replace(origin, lines=_row_lines(block, origin.first - 1))
    if _may_be_rounded(table, schema):
        return _parse_lines_as(block, schema, origin, on_bad, declared=declared), origin
    return conform_table(table, schema, origin, on_bad=on_bad, declared=declared), origin


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


def _parse_lines_as(block: bytes, schema: pa.Schema, origin: RowOrigin, on_bad: BadRowCallback | None, *, declared: bool) -> pa.Table:
    """The slow path: one row at a time, so that an error names its exact line."""
    first_line = origin.first - 1
    tables = []
    row = 0
    for offset, text in enumerate(block.split(b"\n")):
        if not text.strip():
            continue
        number = first_line + offset + 1
        value = _json_object(text, origin.path, number)
        if declared:
            value = {k: v for k, v in value.items() if k in schema.names}
        here = RowOrigin(origin.path, number, "line", origin.shard)
        report = None if on_bad is None else (lambda bad, row=row: on_bad([(row + r, c, m) for r, c, m in bad]))
        tables.append(conform_table(_row_table(value, here), schema, here, on_bad=report, declared=declared))
        row += 1
    return pa.concat_tables(tables) if tables else schema.empty_table()


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


def _json_object(text: bytes, path: str, line: int) -> dict:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise InputDataError(f"{path}: line {line} is not valid JSON ({err}); fix or remove that line and run again") from None
    if not isinstance(value, dict):
        raise InputDataError(f"{path}: line {line} is a JSON {type(value).__name__}, not an object; each JSONL line must be one object")
    return value


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
