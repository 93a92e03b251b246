"""Deprecated: the job's schema rules live in :mod:`airflow_batch_provider.core.domain.schema`.

The README once named ``airflow_batch_provider.core.schemas.schema_from_json`` for reading the
schemas in ``_SUCCESS``; every name this module had still resolves here, with a
``DeprecationWarning`` that names its new home.
"""

from __future__ import annotations

import warnings
from typing import Any

_HOME = "airflow_batch_provider.core.domain.schema"
_MOVED = {
    **dict.fromkeys(
        ("parse_type", "type_name", "declared_schema", "schema_to_json", "schema_from_json",
         "Incompatible", "unify_types", "unify_fields", "unify_schemas", "value_array"),
        "arrow_types",
    ),
    **dict.fromkeys(("RowOrigin", "conform_table", "INPUT_FIX", "OUTPUT_FIX", "BadRowCallback"), "conform"),
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from airflow_batch_provider.core.domain.schema import arrow_types, conform  # on first use only

    warnings.warn(f"{__name__}.{name} is deprecated; use {_HOME}.{module}.{name}", DeprecationWarning, stacklevel=2)
    return getattr({"arrow_types": arrow_types, "conform": conform}[module], name)
