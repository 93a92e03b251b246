"""The lossless conform step: a table made to have the job's schema, changing no value.

Every part of a job must have the same schema, or dataset readers (pyarrow.dataset, pandas,
DuckDB) fail or drop columns. The input schema is settled at plan time (``input.py``); the
output schema is recorded with the first commit, or declared (``output.py``). Tables that do
not have that schema are *conformed* to it here, and only when no value changes: a value
that would change is a bad row, never a silent cast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from airflow_batch_provider.core.domain.schema.arrow_types import is_list, is_number, is_text, type_name
from airflow_batch_provider.core.errors import InputDataError

#: ``on_bad`` receives ``[(row_offset, column, message), ...]`` for rows it must account for.
BadRowCallback = Callable[[list[tuple[int, str, str]]], None]


@dataclass(frozen=True)
class RowOrigin:
    """Where a table's rows came from, for messages.

    ``first`` is the first row's position in the file: its line (1-based, JSONL) or its row
    index (0-based, Parquet), as ``position_name`` says (``Shard.position_name``);
    ``positions`` gives every row's line where blank or rejected lines break the count.
    """

    path: str
    first: int
    position_name: str = "line"  # "line" or "row"
    shard: str = ""
    positions: tuple[int, ...] | None = None

    def where(self, offset: int) -> str:
        if self.position_name == "line":
            return f"line {self.positions[offset] if self.positions else self.first + offset}"
        return f"row {self.first + offset}"


INPUT_FIX = "Declare input_schema on the BatchSpec with a type that holds every value, or fix the input."
OUTPUT_FIX = "Declare output_schema on the BatchSpec, or make the predictor return the same type in every batch."


def conform_table(
    table: pa.Table,
    schema: pa.Schema,
    origin: RowOrigin,
    *,
    fix: str = INPUT_FIX,
    what: str = "the job's schema",
    on_bad: BadRowCallback | None = None,
    declared: bool = False,
) -> pa.Table:
    """``table`` with exactly ``schema`` (its columns, order and types), changing no value.

    A missing column becomes nulls; a column the schema lacks is dropped when it is null in
    every row; a type is cast only when every value comes back unchanged (int32 -> int64,
    int -> float below 2^53, null -> anything...). A row holding a value that would change is
    bad. Without ``on_bad`` the first bad row raises :class:`InputDataError` naming
    ``origin``'s file and line (or row), the column, both types and ``fix``. With ``on_bad``,
    the bad rows are removed from the returned table and passed, once each, to
    ``on_bad([(row_offset, column, message), ...])``, ``row_offset`` counting from the
    table's first row (``origin.where(row_offset)`` names it).

    ``declared`` says ``schema`` is one the user declared: then numbers and booleans are also
    written as text into a string column the user asked for (``5`` -> ``"5"``).
    """
    if table.schema.equals(schema, check_metadata=False):
        return table
    bad: dict[int, tuple[str, str]] = {}
    arrays = []
    for field in schema:
        if field.name not in table.column_names:
            arrays.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        converted, failed = _conform_column(column, field.type, declared)
        arrays.append(converted)
        for row in failed:
            value = column[row].as_py()
            bad.setdefault(row, (field.name, f"column {field.name!r} holds {type_name(column.type)} value {_short(value)}, "
                                             f"which {type_name(field.type)} in {what} cannot hold unchanged"))
    for name in table.column_names:
        if name not in schema.names:
            column = table.column(name)
            for row in _non_null_rows(column):
                bad.setdefault(row, (name, f"column {name!r} (value {_short(column[row].as_py())}) is not in {what} "
                                           f"(columns {schema.names})"))
    if bad and on_bad is None:
        row = min(bad)
        column_name, message = bad[row]
        shard = f" (shard {origin.shard})" if origin.shard else ""
        raise InputDataError(f"{origin.path}: {origin.where(row)}{shard}: {message}. {fix}")
    if bad:
        assert on_bad is not None
        on_bad([(row, column_name, f"{origin.path}: {origin.where(row)}: {message}") for row, (column_name, message) in sorted(bad.items())])
        keep = pa.array([i not in bad for i in range(table.num_rows)])
        arrays = [pc.filter(array, keep) for array in arrays]
    return pa.Table.from_arrays(arrays, schema=schema)


def _conform_column(column: pa.ChunkedArray, target: pa.DataType, declared: bool) -> tuple[pa.Array | pa.ChunkedArray, list[int]]:
    """(the column as ``target``, rows whose value would change). Failed rows hold null."""
    source = column.type
    if source.equals(target):
        return column, []
    if pa.types.is_null(source):
        return pa.nulls(len(column), target), []
    if declared and is_text(target) and (is_number(source) or pa.types.is_boolean(source)):
        return pc.cast(column, target), []
    if not _same_kind(source, target):
        failed = _non_null_rows(column)
        return pa.nulls(len(column), target), failed
    try:
        converted = pc.cast(column, target, safe=True)
        if _round_trips(column, converted):
            return converted, []
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    failed, values = [], []
    for row in range(len(column)):  # the slow path names every row that does not fit
        single = column.slice(row, 1)
        try:
            cast = pc.cast(single, target, safe=True)
            if not _round_trips(single, cast):
                raise ValueError
            values.append(cast.to_pylist()[0])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError):
            failed.append(row)
            values.append(None)
    return pa.array(values, type=target), failed


def _same_kind(source: pa.DataType, target: pa.DataType) -> bool:
    if is_number(source) and (is_number(target) or pa.types.is_decimal(target)):
        return True
    if pa.types.is_decimal(source) and (is_number(target) or pa.types.is_decimal(target)):
        return True
    if is_text(source) and is_text(target):
        return True
    if is_list(source) and is_list(target):
        return True
    if pa.types.is_struct(source) and pa.types.is_struct(target):
        return True
    if pa.types.is_temporal(source) and pa.types.is_temporal(target):
        return True
    if pa.types.is_binary(source) or pa.types.is_large_binary(source):
        return pa.types.is_binary(target) or pa.types.is_large_binary(target)
    return False


def _round_trips(original: pa.ChunkedArray, converted: pa.ChunkedArray) -> bool:
    """Whether every value of ``converted`` equals its original (nulls where nulls were)."""
    if original.null_count != converted.null_count:
        return False
    if _is_flat(original.type) and _is_flat(converted.type):
        try:  # vectorised: cast back and compare (NaN counts as equal to NaN)
            back = pc.cast(converted, original.type, safe=False)
            same = pc.equal(back, original)
            if pa.types.is_floating(original.type):
                same = pc.or_(same, pc.and_(pc.is_nan(back), pc.is_nan(original)))
            return bool(pc.all(same).as_py() in (True, None))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            pass
    before, after = original.to_pylist(), converted.to_pylist()
    return all(_same_value(a, b) for a, b in zip(before, after, strict=True))


def _is_flat(t: pa.DataType) -> bool:
    return is_number(t) or pa.types.is_decimal(t) or is_text(t)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return all(_same_value(a.get(k), b.get(k)) for k in set(a) | set(b))
    return a == b


def _non_null_rows(column: pa.ChunkedArray) -> list[int]:
    if column.null_count == len(column):
        return []
    valid = pc.is_valid(column).to_pylist()
    return [row for row, ok in enumerate(valid) if ok]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
