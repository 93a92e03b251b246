"""The status page plugin is registered once, and Airflow loads it once.

Airflow 3.3 loads a plugin from the ``airflow.plugins`` entry point always, and from a
provider info's ``plugins`` key only with ``[core] lazy_discover_providers = False``; the same
plugin in both is loaded twice and the second skipped with "Plugin ... already registered"
(``airflow/plugins_manager.py``). So the distribution declares it in the entry point alone.
Both discovery modes run here, in a process whose ``sys.path`` holds the provider once (the
installed distribution; the source through a folder without build leftovers, since a stray
``*.egg-info`` on the path is a second copy of the distribution, the other way to get the log).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from airflow_batch_provider.get_provider_info import get_provider_info

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGIN = "batch_sink_status"

LOAD_BOTH_WAYS = r"""
import json
from unittest import mock

from airflow import plugins_manager, settings
from airflow.providers_manager import ProvidersManager

import airflow_batch_provider.get_provider_info as ours


def load(lazy):
    settings.LAZY_LOAD_PROVIDERS = lazy
    plugins_manager._get_plugins.cache_clear()
    plugins, errors = plugins_manager._get_plugins()
    return {"names": [p.name for p in plugins], "errors": list(errors.values())}


result = {"lazy": load(True), "eager": load(False)}  # the default, then providers discovered up front
print("MARK", flush=True)
# what a provider-info "plugins" entry beside the entry point would do (eager discovery only)
info = ours.get_provider_info()
info["plugins"] = [{"name": "batch_sink_status", "plugin-class": "airflow_batch_provider.plugins.sink_status.BatchSinkStatusPlugin"}]
ProvidersManager()._cleanup()
with mock.patch.object(ours, "get_provider_info", lambda: info):
    result["eager, also in provider info"] = load(False)
print("RESULT " + json.dumps(result), flush=True)
"""


def test_the_provider_info_does_not_register_the_plugin_a_second_time():
    assert "plugins" not in get_provider_info()


def test_airflow_loads_the_plugin_once_with_lazy_and_eager_provider_discovery(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    os.symlink(os.path.join(REPO, "airflow_batch_provider"), code / "airflow_batch_provider")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env.update(AIRFLOW_HOME=str(tmp_path / "home"), AIRFLOW__CORE__LOAD_EXAMPLES="False", PYTHONPATH=str(code))
    out = subprocess.run([sys.executable, "-c", LOAD_BOTH_WAYS], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for mode in ("lazy", "eager"):
        assert result[mode]["names"].count(PLUGIN) == 1, result[mode]
        assert not result[mode]["errors"], result[mode]
    assert "already registered" not in out.stdout.split("MARK")[0]  # Airflow's log, which goes to stdout
    # registered in the provider info too, the eager discovery loads it a second time and says so
    both = result["eager, also in provider info"]
    assert both["names"].count(PLUGIN) == 1 and both["errors"] == [f"Plugin {PLUGIN!r} already registered, skipping"]
    assert "already registered" in out.stdout.split("MARK")[1]
