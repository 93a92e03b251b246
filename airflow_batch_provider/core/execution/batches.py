"""The predictor contract (Ray Data's callable class) and batch format conversions.

A predictor is a class named ``"package.module:ClassName"``. ``__init__(**predictor_kwargs)``
loads the model once; ``__call__(batch)`` maps one batch to an output batch, which may have
fewer rows (a filter) or more. Batches are exchanged in the spec's ``batch_format``:

* ``numpy``: ``dict[str, np.ndarray]`` (a 2-D array becomes a fixed-size list column);
* ``pandas``: ``pandas.DataFrame``;
* ``pyarrow``: ``pyarrow.Table``.

A predictor may also define ``use_storage_options(options)``: the runner calls it with the
job's s3fs-style storage options (None for a job on local disk) before each run, so a
predictor that reads files named in its rows (``predictors/images.py``) reads them with the
job's credentials.

Values keep their meaning both ways: a numeric column holding nulls is an object array of
numbers and ``None`` (numpy; a predictor must skip the ``None``) and an integer column is a
pandas ``Int64``-style column, never floats with NaN; a fixed-size list column with nulls is an
object array of rows (arrays or ``None``), so every row stays aligned.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from airflow_batch_provider.core.errors import PredictorError, PredictorOutputError


def load_predictor_class(path: str) -> type:
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise PredictorError(
            f"predictor={path!r}: cannot import module {module_name!r} ({err}). The replicas on the Ray cluster "
            "must be able to import it on every node: install it in the nodes' image, or ship the code with "
            "runtime_env (BatchSpec(runtime_env={'working_dir': '/path/to/code'}) or {'py_modules': [...]}, or a "
            "default in the ray connection's extra: {\"runtime_env\": {...}})"
        ) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise PredictorError(f"predictor={path!r}: module {module_name!r} has no attribute {class_name!r}")
    if not callable(cls):
        raise PredictorError(f"predictor={path!r} is not a class or callable")
    return cls


def build_predictor(path: str, kwargs: dict[str, Any]) -> Callable[[Any], Any]:
    cls = load_predictor_class(path)
    try:
        instance = cls(**kwargs)
    except TypeError as err:
        raise PredictorError(f"predictor={path!r} rejected predictor_kwargs {sorted(kwargs)}: {err}") from None
    if not callable(instance):
        raise PredictorError(f"predictor={path!r}: instances must be callable (define __call__(self, batch))")
    return instance


def to_batch(table: pa.Table, batch_format: str) -> Any:
    if batch_format == "pyarrow":
        return table
    if batch_format == "pandas":
        return table.to_pandas(types_mapper=_nullable_pandas_type)
    return {name: _column_to_numpy(table.column(name)) for name in table.column_names}


def _nullable_pandas_type(data_type: pa.DataType) -> Any:
    """pandas' nullable integer dtypes for Arrow integers (plain int64 would turn nulls into NaN floats)."""
    if pa.types.is_integer(data_type):
        import pandas as pd

        return pd.api.types.pandas_dtype(str(data_type).replace("int", "Int").replace("uInt", "UInt"))
    return None


def _is_number(data_type: pa.DataType) -> bool:
    return pa.types.is_integer(data_type) or pa.types.is_floating(data_type)


def _column_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    if column.null_count and (_is_number(column.type) or pa.types.is_fixed_size_list(column.type)):
        values = column.to_pylist()  # numbers and None / rows and None: no null becomes NaN, nothing shifts
        array = np.empty(len(values), dtype=object)
        item = column.type.value_type.to_pandas_dtype() if pa.types.is_fixed_size_list(column.type) else None
        array[:] = [np.asarray(v, dtype=item) if isinstance(v, list) else v for v in values]
        return array
    if pa.types.is_fixed_size_list(column.type):
        combined = column.combine_chunks()
        width = column.type.list_size
        return combined.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    return column.to_numpy()


def from_batch(output: Any, batch_format: str) -> pa.Table:
    """Convert what ``__call__`` returned back to Arrow; errors say what was wrong."""
    if isinstance(output, pa.Table):
        return output
    if isinstance(output, pa.RecordBatch):
        return pa.Table.from_batches([output])
    if isinstance(output, dict):
        return _dict_to_table(output)
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        pd = None
    if pd is not None and isinstance(output, pd.DataFrame):
        return pa.Table.from_pandas(output, preserve_index=False)
    raise PredictorError(
        f"the predictor returned {type(output).__name__}; return a dict of arrays, a pandas "
        f"DataFrame or a pyarrow Table (batch_format={batch_format!r})"
    )


def _dict_to_table(columns: dict[str, Any]) -> pa.Table:
    arrays = {}
    lengths = {}
    for name, values in columns.items():
        arrays[name] = _to_arrow_array(name, values)
        lengths[name] = len(arrays[name])
    if len(set(lengths.values())) > 1:
        raise PredictorOutputError(
            f"the predictor returned columns of different lengths: {lengths}; every column needs one value per row"
        )
    return pa.table(arrays)


def _to_arrow_array(name: str, values: Any) -> pa.Array:
    """One output column as Arrow, in memory of its own: Arrow would wrap a numpy array
    without copying it, and the part writer holds batches until a row group is full, so a
    predictor that reuses its output buffer would overwrite rows not yet written. A 2-D array
    is a fixed-size list column, and so is a
    column of equal-length 1-D arrays (nulls in place). A Python list of plain values goes to
    Arrow as it is, never through numpy: a list per row is a list column whatever the lengths
    (ragged is fine), and mixed types are refused rather than made strings."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    if isinstance(values, (list, tuple)):
        if not any(isinstance(v, np.ndarray) for v in values):
            return _from_python(name, list(values))
        array = np.empty(len(values), dtype=object)
        for index, value in enumerate(values):
            array[index] = value
    else:
        array = np.asarray(values) if not isinstance(values, np.ndarray) else values
    if array.ndim == 2:
        try:
            flat = pa.array(np.array(array, order="C", copy=True).reshape(-1))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise _mistyped(name, err) from None
        return pa.FixedSizeListArray.from_arrays(flat, array.shape[1])
    if array.ndim > 2:
        raise PredictorOutputError(
            f"column {name!r} has shape {array.shape}; only 1-D and 2-D arrays are supported, "
            "reshape it or return a list per row"
        )
    if array.dtype == object and (rows := _fixed_rows(array)) is not None:
        return rows
    if array.dtype == object:
        return _from_python(name, [v.tolist() if isinstance(v, np.ndarray) else v for v in array.tolist()])
    try:
        return pa.array(np.array(array, copy=True))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        raise _mistyped(name, err) from None


def _from_python(name: str, values: list[Any]) -> pa.Array:
    try:
        try:
            return pa.array(values)
        except OverflowError:  # integers above 2^63 (and none below 0): uint64 holds them exactly
            return pa.array(values, type=pa.uint64())
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError) as err:
        raise _mistyped(name, err) from None


def _mistyped(name: str, err: Exception) -> PredictorOutputError:
    return PredictorOutputError(
        f"the predictor's output column {name!r} cannot be converted to Arrow ({err}); return one type per "
        "column (e.g. all numbers or all strings, None for a missing value)"
    )


def _fixed_rows(array: np.ndarray) -> pa.Array | None:
    """An object array of equal-length 1-D arrays and ``None`` (what ``to_batch`` makes of a
    fixed-size list column with nulls) as that fixed-size list column, nulls in place."""
    present = [v for v in array if v is not None]
    if not present or not all(isinstance(v, np.ndarray) and v.ndim == 1 for v in present):
        return None
    width, dtype = len(present[0]), present[0].dtype
    if any(len(v) != width or v.dtype != dtype for v in present):
        return None
    flat = np.zeros((len(array), width), dtype=dtype)
    valid = np.array([v is not None for v in array], dtype=bool)
    flat[valid] = np.stack(present)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width, mask=pa.array(~valid))
