"""``airflow dags test`` on an autoscaling Ray cluster whose GPU group sits at 0 nodes: Ray's
real autoscaler (v2) with its fake multi-node provider (``tests/autoscaling_cluster.py``).

What a DAG author sees: the plan does not fail for want of a GPU node, it starts the replicas
ahead (asking the autoscaler for their nodes), the shard tasks say what they wait for, the job
completes on the nodes the autoscaler adds, and finalize gives them back."""

from __future__ import annotations

import json
import time

import pytest

from airflow_batch_provider import BatchSpec
from tests.autoscaling_cluster import AutoscalingRayCluster, gpu_node_type
from tests.helpers import rows, sink_ids, write_jsonl
from tests.integration.dagtest import DagTester

pytestmark = pytest.mark.slow

NODE_IDLE_S = 6.0


@pytest.fixture(scope="module")
def cluster():
    ray = AutoscalingRayCluster(label="asdag", node_types={"gpu": gpu_node_type(gpus=1, cpus=1, max_workers=2)},
                                idle_timeout_s=NODE_IDLE_S)
    try:
        ray.start()
        yield ray
    finally:
        ray.stop()


def _gpu_nodes(cluster: AutoscalingRayCluster) -> int:
    """GPU nodes alive, as the autoscaler's fake provider launched them (one raylet each)."""
    import subprocess
    import sys

    probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
             "print('GPU_NODES', sum(1 for n in ray.nodes() if n.get('Alive') and n['Resources'].get('GPU')))")
    out = subprocess.run([sys.executable, "-c", probe, cluster.address], env=cluster.driver_env(), capture_output=True, text=True, timeout=120)
    # the autoscaler's events reach every driver's stdout too: read only the probe's own line
    line = next((line for line in out.stdout.splitlines() if line.startswith("GPU_NODES ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-2000:]
    return int(line.split()[1])


def test_a_gpu_job_runs_on_a_gpu_group_that_scales_from_zero_and_gives_the_nodes_back(cluster, tmp_path):
    source = write_jsonl(str(tmp_path / "in" / "rows.jsonl"), rows(60))
    spec = BatchSpec(source=source, source_format="jsonl", sink=str(tmp_path / "out"), predictor="tests.predictors:SlowDoubler",
                     predictor_kwargs={"sleep_s": 0.5}, rows_per_shard=20, batch_size=10, num_gpus=1, num_cpus=1, num_replicas=2)
    conn = json.dumps({"conn_type": "ray_batch", "host": cluster.address, "password": cluster.token})
    tester = DagTester(str(tmp_path / "airflow"), connections={"ray_batch_default": conn})
    run = tester.run(spec, extra_env={"RAY_ADDRESS": ""})
    assert run.state == "success", run.output[-6000:]
    assert "Started 2 replica(s) ahead" in run.output  # the plan asked the autoscaler for two GPU nodes at once
    assert "waiting for a node with 1 CPU, 1 GPU" in run.output  # a shard task said what it waited for
    assert sink_ids(spec.sink_root) == list(range(60))
    assert "Released" in run.output  # finalize gave the replicas back...
    deadline = time.monotonic() + NODE_IDLE_S + 60
    while _gpu_nodes(cluster) and time.monotonic() < deadline:
        time.sleep(2)
    assert _gpu_nodes(cluster) == 0  # ...and the autoscaler removed their nodes
    assert cluster.token not in run.output
