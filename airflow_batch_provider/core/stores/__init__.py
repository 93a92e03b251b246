"""Where files live: one ``Store`` per backend (local disk, S3) behind one interface.

``base`` holds the interface and what every backend shares (listing and reading through
fsspec, the hashing writer); ``local`` and ``s3`` hold the commit primitives each backend
implements its own way; ``urls`` parses URLs. Imports point one way: backends import
``base`` and ``urls``, never each other, and :func:`store_for` picks one.
"""

from __future__ import annotations

from typing import Any

from airflow_batch_provider.core.stores.base import FileInfo, InputFile, StagedPart, Store
from airflow_batch_provider.core.stores.urls import is_remote, protocol_of


def store_for(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    """The store that serves ``url`` (a local path, ``file://`` or ``s3://`` URL)."""
    protocol = protocol_of(url)
    if protocol == "s3":
        from airflow_batch_provider.core.stores.s3 import S3Store

        return S3Store(storage_options or {})
    if protocol == "file":
        from airflow_batch_provider.core.stores.local import LocalStore

        return LocalStore()
    raise ValueError(f"{url!r}: unsupported storage protocol {protocol!r}; use a local path or s3://")


__all__ = ["FileInfo", "InputFile", "StagedPart", "Store", "is_remote", "store_for"]
