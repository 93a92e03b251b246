"""One Arrow schema per job: declared schemas, unifying types, and the lossless conform step.

Every part of a job must have the same schema, or dataset readers (pyarrow.dataset, pandas,
DuckDB) fail or drop columns. The input schema is settled at plan time (Parquet footers, a
sample of every JSONL shard, or ``BatchSpec.input_schema``); the output schema is recorded
with the first commit (or ``BatchSpec.output_schema``). Tables that do not have that schema
are *conformed* to it here, and only when no value changes: a value that would change is a
bad row, never a silent cast.

Schemas travel as JSON: ``{"columns": {name: type}, "arrow": base64}``; the Arrow IPC bytes
are exact (nested types, metadata), the ``columns`` are for people. Declared schemas are a
plain ``{column: type}`` dict whose types are Arrow names (``int64``, ``string``,
``float32``, ``timestamp[ms]``...) or ``list<T>`` / ``fixed_size_list<T, N>``.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from airflow_batch_provider.core.errors import BatchSpecError, InputDataError

#: ``on_bad`` receives ``[(row_offset, column, message), ...]`` for rows it must account for.
BadRowCallback = Callable[[list[tuple[int, str, str]]], None]

_LIST = re.compile(r"^(large_list|list)\s*<\s*(.+)\s*>$")
_DECIMAL = re.compile(r"^decimal(128|256)?\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)$")
_FIXED = re.compile(r"^fixed_size_list\s*<\s*(.+)\s*,\s*(\d+)\s*>$")


# -- declared schemas ------------------------------------------------------------------------
def parse_type(text: str) -> pa.DataType:
    """An Arrow type from its name: ``int64``, ``list<string>``, ``fixed_size_list<float32, 384>``."""
    text = text.strip()
    if match := _FIXED.match(text):
        return pa.list_(parse_type(match.group(1)), int(match.group(2)))
    if match := _DECIMAL.match(text):
        factory = pa.decimal256 if match.group(1) == "256" else pa.decimal128
        return factory(int(match.group(2)), int(match.group(3)))
    if match := _LIST.match(text):
        item = parse_type(match.group(2))
        return pa.large_list(item) if match.group(1) == "large_list" else pa.list_(item)
    try:
        return pa.type_for_alias(text)
    except (ValueError, KeyError):
        raise BatchSpecError(
            f"unknown Arrow type {text!r}; use names such as int64, float64, string, bool, "
            "timestamp[ms], decimal128(38, 0), list<string> or fixed_size_list<float32, 384>"
        ) from None


def type_name(data_type: pa.DataType) -> str:
    """The name :func:`parse_type` reads back, where there is one (else Arrow's own text)."""
    if pa.types.is_fixed_size_list(data_type):
        return f"fixed_size_list<{type_name(data_type.value_type)}, {data_type.list_size}>"
    if pa.types.is_large_list(data_type):
        return f"large_list<{type_name(data_type.value_type)}>"
    if pa.types.is_list(data_type):
        return f"list<{type_name(data_type.value_type)}>"
    return {"float": "float32", "double": "float64", "halffloat": "float16"}.get(str(data_type), str(data_type))


def declared_schema(name: str, value: Any) -> pa.Schema:
    """``BatchSpec.input_schema`` / ``output_schema`` (``{column: type}``) as an Arrow schema."""
    if not isinstance(value, dict) or not value or not all(isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()):
        raise BatchSpecError(f"{name} must map column names to Arrow type names, e.g. {{'id': 'int64', 'text': 'string'}}; got {value!r}")
    return pa.schema([(column, parse_type(text)) for column, text in value.items()])


# -- schemas in the plan, the checkpoint and _SUCCESS ------------------------------------------
def schema_to_json(schema: pa.Schema) -> dict[str, Any]:
    return {
        "columns": {field.name: type_name(field.type) for field in schema},
        "arrow": base64.b64encode(schema.serialize().to_pybytes()).decode(),
    }


def schema_from_json(data: dict[str, Any]) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(data["arrow"])))


# -- unifying ----------------------------------------------------------------------------------
class Incompatible(Exception):
    """Two types that no type holds without changing values."""


def unify_types(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    """The narrowest type holding every value of ``a`` and of ``b`` (JSON's rules: int and
    float give float64; null or absent takes the other type). Raises :class:`Incompatible`."""
    if a.equals(b) or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        return _unify_integers(a, b)
    if _is_number(a) and _is_number(b):
        return pa.float64()
    if _is_text(a) and _is_text(b):
        return pa.large_string() if pa.types.is_large_string(a) or pa.types.is_large_string(b) else pa.string()
    if _is_list(a) and _is_list(b):
        item = unify_types(a.value_type, b.value_type)
        if pa.types.is_fixed_size_list(a) and pa.types.is_fixed_size_list(b) and a.list_size == b.list_size:
            return pa.list_(item, a.list_size)
        return pa.large_list(item) if pa.types.is_large_list(a) or pa.types.is_large_list(b) else pa.list_(item)
    if pa.types.is_struct(a) and pa.types.is_struct(b):
        return pa.struct(list(unify_fields(list(a), list(b))))
    raise Incompatible(f"{a} and {b}")


def unify_fields(a: list[pa.Field], b: list[pa.Field]) -> list[pa.Field]:
    """Union of two field lists, by name, in first-seen order, each with the unified type."""
    merged: dict[str, pa.DataType] = {f.name: f.type for f in a}
    for field in b:
        merged[field.name] = unify_types(merged[field.name], field.type) if field.name in merged else field.type
    return [pa.field(name, data_type) for name, data_type in merged.items()]


def unify_schemas(named: list[tuple[str, pa.Schema]], fix: str) -> pa.Schema:
    """One schema from per-file (or per-shard) schemas; the error names the two files."""
    fields: dict[str, tuple[pa.DataType, str]] = {}
    for where, schema in named:
        for field in schema:
            if field.name not in fields:
                fields[field.name] = (field.type, where)
                continue
            seen, first = fields[field.name]
            try:
                fields[field.name] = (unify_types(seen, field.type), first if not pa.types.is_null(seen) else where)
            except Incompatible:
                raise InputDataError(
                    f"column {field.name!r} is {type_name(seen)} in {first} but {type_name(field.type)} in {where}; "
                    f"no type holds both without changing values. {fix}"
                ) from None
    return pa.schema([(name, data_type) for name, (data_type, _) in fields.items()])


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _unify_integers(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    if pa.types.is_signed_integer(a) == pa.types.is_signed_integer(b):
        return a if a.bit_width >= b.bit_width else b
    signed, unsigned = (a, b) if pa.types.is_signed_integer(a) else (b, a)
    if unsigned.bit_width < 64 and signed.bit_width <= unsigned.bit_width:
        return {8: pa.int16(), 16: pa.int32(), 32: pa.int64()}[unsigned.bit_width]
    if unsigned.bit_width < signed.bit_width:
        return signed
    return pa.decimal128(20, 0)  # int64 and uint64 values both fit exactly


# -- one Python value (a parsed JSON value) -----------------------------------------------------
_INT64 = (-(2**63), 2**63 - 1)


def value_array(value: Any) -> pa.Array:
    """A one-value Arrow array of the value's exact type: int64 or, above 2^63, uint64.

    Raises :class:`Incompatible` for an integer no 64-bit type holds, and Arrow's error for a
    value Arrow cannot type (e.g. a list mixing numbers and strings)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if _INT64[0] <= value <= _INT64[1]:
            return pa.array([value], type=pa.int64())
        if 0 <= value < 2**64:
            return pa.array([value], type=pa.uint64())
        raise Incompatible(f"the integer {value} needs more than 64 bits")
    return pa.array([value])


def is_wide_int(value: Any) -> bool:
    """Whether ``value`` is an integer that int64 cannot hold."""
    return isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]


# -- conforming --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowOrigin:
    """Where a table's rows came from, for messages.

    ``first`` is the first row's line (1-based, JSONL) or row index in the file (0-based,
    Parquet); ``lines`` gives every row's line where blank lines break the count.
    """

    path: str
    first: int
    unit: str = "line"  # "line" or "row"
    shard: str = ""
    lines: tuple[int, ...] | None = None

    def where(self, offset: int) -> str:
        if self.unit == "line":
            return f"line {self.lines[offset] if self.lines else self.first + offset}"
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
    if declared and _is_text(target) and (_is_number(source) or pa.types.is_boolean(source)):
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
    if _is_number(source) and (_is_number(target) or pa.types.is_decimal(target)):
        return True
    if pa.types.is_decimal(source) and (_is_number(target) or pa.types.is_decimal(target)):
        return True
    if _is_text(source) and _is_text(target):
        return True
    if _is_list(source) and _is_list(target):
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
    return _is_number(t) or pa.types.is_decimal(t) or _is_text(t)


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
