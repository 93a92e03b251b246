from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

from airflow_batch_provider.get_provider_info import get_provider_info


def test_entry_point_and_required_keys():
    eps = [ep for ep in entry_points(group="apache_airflow_provider") if ep.value.startswith("airflow_batch_provider")]
    assert len(eps) == 1
    info = eps[0].load()()
    assert info["package-name"] == "airflow-batch-provider"
    assert {"name", "description", "connection-types"} <= set(info)
    assert info == get_provider_info()


def test_modules_listed_in_provider_info_import():
    import importlib

    info = get_provider_info()
    for section in ("operators", "hooks", "triggers"):
        for entry in info.get(section, []):
            for module in entry["python-modules"]:
                importlib.import_module(module)
    for conn in info["connection-types"]:
        module, _, cls = conn["hook-class-name"].rpartition(".")
        assert getattr(importlib.import_module(module), cls).conn_type == conn["connection-type"]


def test_airflow_sees_the_provider_and_the_ray_connection_type(tmp_path):
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    airflow = os.path.join(os.path.dirname(sys.executable), "airflow")
    out = subprocess.run([airflow, "providers", "list", "-o", "json"], env=env, capture_output=True, text=True, check=True)
    assert "airflow-batch-provider" in {p["package_name"] for p in json.loads(out.stdout)}
