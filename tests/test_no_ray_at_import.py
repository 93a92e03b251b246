"""No Airflow process imports Ray unless it runs a shard.

Airflow's scheduler, DAG processor, triggerer and Celery workers load plugins, provider info,
extra links and DAG files, and then fork task processes. A task forked from a process that
has Ray's core library loaded can be aborted by Ray while it connects (``Check failed:
WarmupStore()``, a C++ abort; ``tests/deployment/test_many_starts.py`` starts many tasks at
once through a real scheduler). So everything such a process loads must leave Ray unloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What Airflow's long-lived processes load, the way they load it.
LOAD_AS_AIRFLOW_DOES = textwrap.dedent(
    """
    import sys

    from airflow import plugins_manager
    from airflow.providers_manager import ProvidersManager

    plugins_manager.ensure_plugins_loaded()
    plugins_manager.get_fastapi_plugins()
    plugins_manager.get_operator_extra_links()
    names = [p["name"] for p in plugins_manager.get_plugin_info()]
    assert "batch_sink_status" in names, names
    providers = ProvidersManager()
    providers.initialize_providers_hooks()
    providers.initialize_providers_extra_links()
    assert "airflow-batch-provider" in providers.providers
    assert "ray_batch" in providers.hooks
    providers.hooks["ray_batch"]  # the connection form's hook class is imported

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=sys.argv[1])
    assert not bag.import_errors, bag.import_errors
    assert bag.dags, "no DAG parsed"

    import airflow_batch_provider.cli  # noqa: F401  (the airflow-batch CLI reads sinks, never runs shards)
    import airflow_batch_provider.triggers.shard  # noqa: F401  (the triggerer's trigger class)

    loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
    print("RAY_MODULES", loaded)
    """
)


def test_plugins_providers_links_and_dag_parsing_leave_ray_unloaded(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env.update(AIRFLOW_HOME=str(tmp_path), PYTHONPATH=REPO, AIRFLOW__CORE__LOAD_EXAMPLES="False")
    out = subprocess.run(
        [sys.executable, "-c", LOAD_AS_AIRFLOW_DOES, os.path.join(REPO, "dags")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "RAY_MODULES []" in out.stdout, f"Ray was imported: {out.stdout[-2000:]}"


# What the DAG processor does with a DAG file, and nothing more.
PARSE_DAGS = textwrap.dedent(
    """
    import sys

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=sys.argv[1])
    assert not bag.import_errors, bag.import_errors
    assert bag.dags, "no DAG parsed"
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "pyarrow", "torch"))
    print("HEAVY_MODULES", heavy[:10])
    """
)


def test_parsing_dag_files_loads_neither_ray_nor_pyarrow(tmp_path):
    """``batch_inference()`` builds the task group from the spec alone: the DAG processor
    parses every DAG file often, and must not pay for (or fork with) Ray, pyarrow or a model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env.update(AIRFLOW_HOME=str(tmp_path), PYTHONPATH=REPO, AIRFLOW__CORE__LOAD_EXAMPLES="False")
    out = subprocess.run(
        [sys.executable, "-c", PARSE_DAGS, os.path.join(REPO, "dags")], env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "HEAVY_MODULES []" in out.stdout, out.stdout[-2000:]
