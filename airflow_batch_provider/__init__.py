"""Resumable, sharded offline batch inference on Ray, as an Apache Airflow provider.

``BatchSpec`` comes from the Airflow-free core; ``batch_inference`` (the task group
factory) is imported lazily so that the core can be used without Airflow installed.
"""

from __future__ import annotations

from typing import Any

from airflow_batch_provider.core.spec import BatchSpec

__version__ = "0.1.0"
__all__ = ["BatchSpec", "batch_inference", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "batch_inference":
        from airflow_batch_provider.task_group import batch_inference

        return batch_inference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
