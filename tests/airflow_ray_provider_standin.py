"""A stand-in for Airflow's own Ray provider (apache-airflow-providers-ray), installed into a folder.

That package is not on the package index this project installs from, so it cannot be installed
here; what matters to "both providers installed together" is what Airflow's ProvidersManager
reads from it: a distribution named ``apache-airflow-providers-ray`` whose
``apache_airflow_provider`` entry point returns its provider info, and the hook class that info
names. This writes exactly that: the provider info's connection facts copied from the real
provider (apache/airflow, ``providers/ray/src/airflow/providers/ray/get_provider_info.py``:
connection type ``ray``, hook ``airflow.providers.ray.hooks.ray.RayHook``, its hidden fields
and its ``conn-fields``), a hook module with the real hook's class attributes and nothing else
(no Ray, Kubernetes or job submission), and a ``.dist-info`` with the entry point. Put the
folder on ``PYTHONPATH``: ``airflow`` extends its ``__path__`` over every ``airflow/`` folder on
``sys.path``, so ``airflow.providers.ray`` imports from it.
"""

from __future__ import annotations

import json
from pathlib import Path

PACKAGE = "apache-airflow-providers-ray"
VERSION = "0.0.1"  # the real provider's pyproject version at the copied commit
HOOK_CLASS = "airflow.providers.ray.hooks.ray.RayHook"

#: copied from the real provider info (connection part and identity); only the modules the
#: stand-in has are listed (its operators and triggers are left out).
PROVIDER_INFO = {
    "package-name": PACKAGE,
    "name": "Ray",
    "description": "`Ray <https://docs.ray.io/>`__ provider for Apache Airflow.\n"
                   "Manage Kubernetes-hosted Ray clusters and submit distributed Ray jobs from Airflow Dags.\n",
    "integrations": [{"integration-name": "Ray", "external-doc-url": "https://docs.ray.io/", "tags": ["ai", "machine-learning", "software"]}],
    "hooks": [{"integration-name": "Ray", "python-modules": ["airflow.providers.ray.hooks.ray"]}],
    "connection-types": [
        {
            "hook-class-name": HOOK_CLASS,
            "hook-name": "Ray",
            "connection-type": "ray",
            "ui-field-behaviour": {"hidden-fields": ["host", "schema", "login", "password", "port"], "relabeling": {}},
            "conn-fields": {
                "address": {"label": "Ray dashboard URL", "schema": {"type": ["string", "null"]}},
                "cookies": {"label": "Cookies", "schema": {"type": ["string", "null"]}},
                "metadata": {"label": "Metadata", "schema": {"type": ["string", "null"]}},
                "headers": {"label": "Headers", "schema": {"type": ["string", "null"]}},
                "verify": {"label": "Verify TLS", "schema": {"type": ["boolean", "null"], "default": True}},
                "kube_config_path": {"label": "Kubeconfig path", "schema": {"type": ["string", "null"]}},
                "kube_config": {"label": "Kubeconfig (JSON format)", "schema": {"type": ["string", "null"], "format": "password"}},
                "namespace": {"label": "Kubernetes namespace", "schema": {"type": ["string", "null"]}},
                "cluster_context": {"label": "Kubernetes cluster context", "schema": {"type": ["string", "null"]}},
            },
        }
    ],
}

HOOK_MODULE = '''"""Stand-in for apache-airflow-providers-ray's hook: its class attributes only."""
from airflow.sdk import BaseHook


class RayHook(BaseHook):
    conn_name_attr = "conn_id"
    default_conn_name = "ray_default"
    conn_type = "ray"
    hook_name = "Ray"
'''


def install(site: Path) -> Path:
    """Write the stand-in distribution into ``site`` (a folder to put on ``PYTHONPATH``)."""
    package = site / "airflow" / "providers" / "ray"
    (package / "hooks").mkdir(parents=True)
    (package / "__init__.py").write_text(f'__version__ = "{VERSION}"\n')
    (package / "hooks" / "__init__.py").write_text("")
    (package / "hooks" / "ray.py").write_text(HOOK_MODULE)
    (package / "get_provider_info.py").write_text(
        f"import json\n\n\ndef get_provider_info():\n    return json.loads({json.dumps(json.dumps(PROVIDER_INFO))})\n")
    dist = site / f"apache_airflow_providers_ray-{VERSION}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n")
    (dist / "entry_points.txt").write_text(
        "[apache_airflow_provider]\nprovider_info = airflow.providers.ray.get_provider_info:get_provider_info\n")
    return site
