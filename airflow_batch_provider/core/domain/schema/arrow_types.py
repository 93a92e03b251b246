"""The type rules of the job's one Arrow schema: type names, declared schemas, their JSON
form, and which type holds the values of two others.

Declared schemas are a plain ``{column: type}`` dict whose types are Arrow names (``int64``,
``string``, ``float32``, ``timestamp[ms]``...) or ``list<T>`` / ``fixed_size_list<T, N>``.
Schemas travel as JSON (in the plan, the checkpoint and ``_SUCCESS``):
``{"columns": {name: type}, "arrow": base64}``; the Arrow IPC bytes are exact (nested types,
metadata), the ``columns`` are for people. Unifying follows JSON's rules (int and float give
float64; null or absent takes the other type) and never picks a type that changes a value.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import pyarrow as pa

from airflow_batch_provider.core.errors import BatchSpecError, InputDataError

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
    if is_number(a) and is_number(b):
        return pa.float64()
    if is_text(a) and is_text(b):
        return pa.large_string() if pa.types.is_large_string(a) or pa.types.is_large_string(b) else pa.string()
    if is_list(a) and is_list(b):
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


def _unify_integers(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    if pa.types.is_signed_integer(a) == pa.types.is_signed_integer(b):
        return a if a.bit_width >= b.bit_width else b
    signed, unsigned = (a, b) if pa.types.is_signed_integer(a) else (b, a)
    if unsigned.bit_width < 64 and signed.bit_width <= unsigned.bit_width:
        return {8: pa.int16(), 16: pa.int32(), 32: pa.int64()}[unsigned.bit_width]
    if unsigned.bit_width < signed.bit_width:
        return signed
    return pa.decimal128(20, 0)  # int64 and uint64 values both fit exactly


# -- kinds of types (what may be cast to what) -----------------------------------------------
def is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


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
