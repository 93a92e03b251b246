"""The predictor contract (Ray Data's callable class) and batch format conversions.

A predictor is a class named ``"package.module:ClassName"``. ``__init__(**predictor_kwargs)``
loads the model once; ``__call__(batch)`` maps one batch to an output batch, which may have
fewer rows (a filter) or more. Batches are exchanged in the spec's ``batch_format``:

* ``numpy``: ``dict[str, np.ndarray]`` (a 2-D array becomes a fixed-size list column);
* ``pandas``: ``pandas.DataFrame``;
* ``pyarrow``: ``pyarrow.Table``.
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
            f"predictor={path!r}: cannot import module {module_name!r} ({err}); it must be "
            "installed (or on PYTHONPATH) on the Ray workers as well as the Airflow workers"
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
        return table.to_pandas()
    return {name: _column_to_numpy(table.column(name)) for name in table.column_names}


def _column_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
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
    """One output column as Arrow. A 2-D array is a fixed-size list column. A Python list
    goes to Arrow as it is, never through numpy: a list per row is a list column whatever
    the lengths (ragged is fine), and mixed types are refused rather than made strings."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    if isinstance(values, (list, tuple)):
        return _from_python(name, list(values))
    array = np.asarray(values) if not isinstance(values, np.ndarray) else values
    if array.ndim == 2:
        try:
            flat = pa.array(np.ascontiguousarray(array).reshape(-1))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise _mistyped(name, err) from None
        return pa.FixedSizeListArray.from_arrays(flat, array.shape[1])
    if array.ndim > 2:
        raise PredictorOutputError(
            f"column {name!r} has shape {array.shape}; only 1-D and 2-D arrays are supported, "
            "reshape it or return a list per row"
        )
    if array.dtype == object:
        return _from_python(name, array.tolist())
    try:
        return pa.array(array)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        raise _mistyped(name, err) from None


def _from_python(name: str, values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        raise _mistyped(name, err) from None


def _mistyped(name: str, err: Exception) -> PredictorOutputError:
    return PredictorOutputError(
        f"the predictor's output column {name!r} cannot be converted to Arrow ({err}); return one type per "
        "column (e.g. all numbers or all strings, None for a missing value)"
    )
