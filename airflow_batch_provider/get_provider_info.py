"""Provider metadata, found by Airflow through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any

from airflow_batch_provider import __version__
from airflow_batch_provider.core import api
from airflow_batch_provider.hooks import ray_connection

#: the section of Airflow's configuration that ``airflow_batch_provider.settings`` reads.
CONFIG_SECTION = "batch_inference"


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-batch-provider",
        "name": "Batch inference on Ray",
        "description": "Resumable, sharded offline (GPU) batch inference on Ray, one mapped task per shard.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Ray batch inference",
                "external-doc-url": "https://docs.ray.io/",
                "tags": ["software"],
            }
        ],
        "operators": [
            {
                "integration-name": "Ray batch inference",
                "python-modules": ["airflow_batch_provider.operators.batch"],
            }
        ],
        "hooks": [
            {
                "integration-name": "Ray batch inference",
                "python-modules": ["airflow_batch_provider.hooks.ray"],
            }
        ],
        "triggers": [
            {
                "integration-name": "Ray batch inference",
                "python-modules": ["airflow_batch_provider.triggers.shard"],
            }
        ],
        "extra-links": ["airflow_batch_provider.links.sink_status.SinkStatusLink"],
        "config": provider_config(),
        # ray_batch, not ray: apache-airflow-providers-ray registers ray for its own connection,
        # and Airflow keeps one hook per type (hooks/ray_connection.py).
        "connection-types": [
            {
                "connection-type": ray_connection.CONN_TYPE,
                "hook-class-name": "airflow_batch_provider.hooks.ray.RayHook",
                "hook-name": "Ray (batch inference)",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "login", "extra"],
                    "relabeling": {"host": "Ray address", "password": "Ray auth token"},
                    "placeholders": {"host": "10.0.0.5:6379 or ray://head:10001", "password": "RAY_AUTH_TOKEN"},
                },
            }
        ],
    }


def provider_config() -> dict[str, Any]:
    """``[batch_inference]``, one option per field of the core's ``Tunables`` (docs, ``airflow config list``)."""
    defaults = api.Tunables()
    options = {
        name: {"description": doc, "version_added": "0.1.0", "type": "float", "example": None,
               "default": "" if getattr(defaults, name) is None else str(getattr(defaults, name))}
        for name, doc in api.Tunables.docs().items()
    }
    return {CONFIG_SECTION: {"description": "Timeouts of batch inference on Ray: replicas, leases, connections, cancellation.",
                             "options": options}}
