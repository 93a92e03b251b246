"""Declared schema names, the unification rules, and the conform step's refusals."""

from __future__ import annotations

import pyarrow as pa
import pytest

from airflow_batch_provider.core.domain.schema.arrow_types import Incompatible, parse_type, schema_from_json, schema_to_json, type_name, unify_types
from airflow_batch_provider.core.domain.schema.conform import RowOrigin, conform_table
from airflow_batch_provider.core.errors import BatchSpecError, InputDataError


@pytest.mark.parametrize("text, expected", [
    ("int64", pa.int64()),
    ("float32", pa.float32()),
    ("string", pa.string()),
    ("timestamp[ms]", pa.timestamp("ms")),
    ("decimal128(38, 0)", pa.decimal128(38, 0)),
    ("list<string>", pa.list_(pa.string())),
    ("fixed_size_list<float32, 384>", pa.list_(pa.float32(), 384)),
    ("list<list<int64>>", pa.list_(pa.list_(pa.int64()))),
])
def test_type_names_parse_and_print_back(text, expected):
    assert parse_type(text) == expected
    assert parse_type(type_name(expected)) == expected


def test_unknown_type_name_says_what_is_allowed():
    with pytest.raises(BatchSpecError, match="unknown Arrow type 'integer'; use names such as int64"):
        parse_type("integer")


@pytest.mark.parametrize("a, b, expected", [
    (pa.null(), pa.string(), pa.string()),
    (pa.int32(), pa.int64(), pa.int64()),
    (pa.int64(), pa.float64(), pa.float64()),
    (pa.uint32(), pa.int32(), pa.int64()),
    (pa.int64(), pa.uint64(), pa.decimal128(20, 0)),
    (pa.list_(pa.null()), pa.list_(pa.int64()), pa.list_(pa.int64())),
    (pa.list_(pa.float32(), 3), pa.list_(pa.float32()), pa.list_(pa.float32())),
    (pa.struct([("a", pa.int64())]), pa.struct([("b", pa.string())]), pa.struct([("a", pa.int64()), ("b", pa.string())])),
])
def test_unify_types(a, b, expected):
    assert unify_types(a, b) == expected
    assert unify_types(b, a).equals(expected) or set(unify_types(b, a)) == set(expected)


@pytest.mark.parametrize("a, b", [(pa.int64(), pa.string()), (pa.bool_(), pa.int64()), (pa.list_(pa.int64()), pa.string())])
def test_types_no_type_holds_are_incompatible(a, b):
    with pytest.raises(Incompatible):
        unify_types(a, b)


def test_schema_json_round_trip_is_exact():
    schema = pa.schema([("id", pa.uint64()), ("vec", pa.list_(pa.float32(), 4)), ("m", pa.struct([("k", pa.string())]))])
    data = schema_to_json(schema)
    assert data["columns"] == {"id": "uint64", "vec": "fixed_size_list<float32, 4>", "m": "struct<k: string>"}
    assert schema_from_json(data) == schema


def test_conform_refuses_a_lossy_cast_and_names_row_column_and_types():
    table = pa.table({"x": pa.array([1.0, 2.25])})
    with pytest.raises(InputDataError) as err:
        conform_table(table, pa.schema([("x", pa.int64())]), RowOrigin("data.parquet", 40, "row", "abc"))
    assert str(err.value) == (
        "data.parquet: row 41 (shard abc): column 'x' holds float64 value 2.25, which int64 in the job's schema "
        "cannot hold unchanged. Declare input_schema on the BatchSpec with a type that holds every value, or fix the input."
    )


def test_conform_adds_missing_columns_as_nulls_and_orders_columns():
    table = pa.table({"b": ["x"], "a": pa.array([1], pa.int32())})
    schema = pa.schema([("a", pa.int64()), ("b", pa.string()), ("c", pa.float64())])
    out = conform_table(table, schema, RowOrigin("f", 1))
    assert out.schema == schema and out.to_pylist() == [{"a": 1, "b": "x", "c": None}]


@pytest.mark.parametrize("name, home", [("schema_from_json", "arrow_types"), ("conform_table", "conform")])
def test_the_old_schemas_module_still_answers_with_a_deprecation_warning(name, home):
    """The README named ``core.schemas.schema_from_json`` for reading _SUCCESS's schemas."""
    import importlib

    from airflow_batch_provider.core import schemas

    new = importlib.import_module(f"airflow_batch_provider.core.domain.schema.{home}")
    with pytest.warns(DeprecationWarning, match=rf"core\.schemas\.{name} is deprecated; use airflow_batch_provider\.core\.domain\.schema\.{home}\.{name}"):
        assert getattr(schemas, name) is getattr(new, name)
    with pytest.raises(AttributeError):
        schemas.is_wide_int  # noqa: B018 (dead, removed)
