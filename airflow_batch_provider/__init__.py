"""Resumable, sharded offline batch inference on Ray, as an Apache Airflow provider.

``BatchSpec`` is the core's job description plus the Airflow connection for S3 (importing
it needs no Airflow); ``batch_inference`` (the task group factory) is imported lazily, so
that the core (``airflow_batch_provider.core.api``) can be used without Airflow installed.
"""

from __future__ import annotations

from typing import Any

from airflow_batch_provider.spec import BatchSpec

__version__ = "0.1.0"
__all__ = ["BatchSpec", "batch_inference", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "batch_inference":
        from airflow_batch_provider.task_group import batch_inference

        return batch_inference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
