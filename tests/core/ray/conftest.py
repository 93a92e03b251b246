"""A real multi-node Ray cluster with virtual GPUs, for the resource-shape and code-shipping tests.

Its nodes run with the repository on their ``PYTHONPATH`` (the provider), and nothing else:
a predictor written to a temp dir reaches them only through ``runtime_env``. The tests drive
it from child processes (``ray.init`` holds a process for life, and this pytest process joins
its own local Ray in other modules).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.ray_cluster import RayCluster

GiB = 2**30


@pytest.fixture(scope="session")
def gpu_cluster():
    """A head without CPUs and two 2-CPU worker nodes of one virtual GPU and 2 GiB of Ray memory
    each: node ``a`` is an H100 node (``accelerator_type:H100``), node ``b`` has a custom
    ``tpu_slice`` resource."""
    cluster = RayCluster("shapes").start()
    try:
        cluster.add_node("a", cpus=2, gpus=1, resources={"accelerator_type:H100": 1}, memory=2 * GiB)
        cluster.add_node("b", cpus=2, gpus=1, resources={"tpu_slice": 1}, memory=2 * GiB)
        yield cluster
    finally:
        cluster.stop()


def run_driver(cluster: RayCluster, script: str, args: dict, timeout: float = 400, *, address: str | None = None) -> dict:
    """Run ``script`` in a child process connected to ``cluster`` (``connect`` with its token);
    the script gets ``ARGS`` (``args``) and sets ``RESULT``, which comes back as a dict.
    ``address``: another address of the cluster (its ``ray://`` one), else its GCS address."""
    prelude = (
        "import json, sys\n"
        "from airflow_batch_provider.core.ray.connection import RayTarget, connect\n"
        "ARGS = json.loads(sys.argv[1])\n"
        "connect(RayTarget(address=ARGS['address'], token=ARGS['token']), timeout_s=60)\n"
        "RESULT = {}\n"
    )
    epilogue = "\nprint('RESULT ' + json.dumps(RESULT))\n"
    env = {k: v for k, v in cluster.env().items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}  # the token comes in the target
    out = subprocess.run([sys.executable, "-c", prelude + script + epilogue, json.dumps({**args, "address": address or cluster.address, "token": cluster.token})],
                         env=env, capture_output=True, text=True, timeout=timeout)
    line = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
    assert out.returncode == 0 and line, out.stdout[-3000:] + out.stderr[-5000:]
    return json.loads(line[len("RESULT "):])
