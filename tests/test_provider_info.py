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


# Airflow's ProvidersManager, with this provider and Airflow's Ray provider (a stand-in with its
# real provider info, tests/airflow_ray_provider_standin.py) installed together; then the same
# with this provider's info as it was before ray_batch, to show the clash this test would see.
BOTH_PROVIDERS = r"""
import json
import sys
from unittest import mock

from airflow.providers_manager import ProvidersManager

import airflow_batch_provider.get_provider_info as ours


def snapshot(pm):
    # what the connection form is built from (no hook imported), per connection type
    pm.initialize_providers_hooks()
    ui = {m.connection_type: m for m in pm.iter_connection_type_hook_ui_metadata() if m.connection_type in ("ray", "ray_batch")}
    return {
        "providers": sorted(p for p in pm.providers if p in ("airflow-batch-provider", "apache-airflow-providers-ray")),
        "hooks": {t: (pm._hook_provider_dict[t].package_name, m.hook_class_name, m.hook_name) for t, m in ui.items()},
        "behaviours": {t: m.field_behaviour for t, m in ui.items()},
        "widgets": sorted(k for k in pm._connection_form_widgets_from_metadata if "__ray" in k),
    }


pm = ProvidersManager()
print("NOW", json.dumps(snapshot(pm)), flush=True)
# the task runtime's view imports each hook class
from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

runtime = ProvidersManagerTaskRuntime().hooks
print("RUNTIME", json.dumps({t: (runtime[t].package_name, runtime[t].hook_class_name) for t in ("ray", "ray_batch")}), flush=True)
print("MARK", flush=True)
legacy = ours.get_provider_info()
legacy["connection-types"][0]["connection-type"] = "ray"
pm._cleanup()
with mock.patch.object(ours, "get_provider_info", lambda: legacy):
    print("BEFORE", json.dumps(snapshot(pm)), flush=True)
"""


def test_airflows_ray_provider_and_this_one_load_together_without_a_clash(tmp_path):
    from tests import airflow_ray_provider_standin as standin

    site = standin.install(tmp_path / "site")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env.update(AIRFLOW_HOME=str(tmp_path / "home"), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               PYTHONPATH=os.pathsep.join([str(site), here]))
    out = subprocess.run([sys.executable, "-c", BOTH_PROVIDERS], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    now_part, before_part = text.split("MARK", 1)
    now = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("NOW "))[4:])
    assert now["providers"] == ["airflow-batch-provider", "apache-airflow-providers-ray"]
    assert now["hooks"] == {
        "ray": ["apache-airflow-providers-ray", standin.HOOK_CLASS, "Ray"],
        "ray_batch": ["airflow-batch-provider", "airflow_batch_provider.hooks.ray.RayHook", "Ray (batch inference)"],
    }
    assert now["behaviours"]["ray"]["hidden_fields"] == ["host", "schema", "login", "password", "port"]
    assert now["behaviours"]["ray_batch"]["relabeling"] == {"host": "Ray address", "password": "Ray auth token"}
    assert now["widgets"] == sorted(f"extra__ray__{f}" for f in standin.PROVIDER_INFO["connection-types"][0]["conn-fields"])
    runtime = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RUNTIME "))[8:])
    assert runtime == {"ray": [standin.PACKAGE, standin.HOOK_CLASS], "ray_batch": ["airflow-batch-provider", "airflow_batch_provider.hooks.ray.RayHook"]}
    for clash in ("already registered", "already exists, skipping", "already added, skipping"):
        assert clash not in now_part, now_part[-3000:]
    # before ray_batch: Airflow kept one hook for 'ray' (ours, first by package name), logged
    # the other, and mixed the two forms (our labels, their extra fields under one type)
    before = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("BEFORE "))[7:])
    assert before["hooks"] == {"ray": ["airflow-batch-provider", "airflow_batch_provider.hooks.ray.RayHook", "Ray"]}
    assert before["behaviours"]["ray"]["relabeling"] == {"host": "Ray address", "password": "Ray auth token"}
    assert "extra__ray__address" in before["widgets"]
    assert "The connection_type 'ray' has been already registered by provider 'airflow-batch-provider.'" in before_part
