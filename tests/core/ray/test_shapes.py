"""Replica shapes on a real multi-node Ray with virtual GPUs: the pool sizes and places replicas
node by node, by everything a replica asks for (fractional and multi-GPU ``num_gpus``,
``accelerator_type``, custom ``resources``, ``memory``), and a shape no node can hold is
refused at once, naming what each node has.

The cluster (``gpu_cluster``): node ``a`` with 2 CPUs, 1 GPU, 2 GiB and ``accelerator_type:H100``;
node ``b`` with 2 CPUs, 1 GPU, 2 GiB and ``tpu_slice: 1``. Replicas ask for half a CPU.
"""

from __future__ import annotations

import pytest

from airflow_batch_provider.core.ray.sizing import fits
from tests.core.ray.conftest import GiB, run_driver
from tests.helpers import rows, write_jsonl

pytestmark = pytest.mark.slow

SCENARIOS = """
import psutil, ray
from airflow_batch_provider.core.api import new_attempt, plan
from airflow_batch_provider.core.errors import ResourcesUnavailableError
from airflow_batch_provider.core.ray.pool import ReplicaPool, find_replica
from airflow_batch_provider.core.spec import JobSpec

def pool(**shape):
    return ReplicaPool(JobSpec(source=ARGS["source"], source_format="jsonl", sink=ARGS["sink"],
                               predictor="tests.predictors:Doubler", num_cpus=0.5, resume=False, **shape))

def placed(**shape):
    # Start every replica the pool sizes; wait until all are loaded and answer together, then
    # run the job's shards on them.
    replicas = pool(**shape)
    try:
        names = replicas.start(wanted=replicas.size())
        infos = ray.get([find_replica(name).info.remote() for name in names], timeout=240)
        # Where each runs, read while all are alive: the process ancestry names its node's raylet.
        ancestry = [[info["pid"]] + [p.pid for p in psutil.Process(info["pid"]).parents()] for info in infos]
        results = replicas.result(replicas.submit(plan(replicas.spec).pending, new_attempt()))
        return {"size": replicas.size(), "pids": [info["pid"] for info in infos], "ancestry": ancestry,
                "shards": [(r["status"], r["rows_out"], r["worker_pid"]) for r in results]}
    finally:
        replicas.shutdown(force=True)

def refused(**shape):
    try:
        pool(**shape).start(wanted=1)
    except ResourcesUnavailableError as err:
        return str(err)
    return None

RESULT["half_gpu_h100"] = placed(num_gpus=0.5, accelerator_type="H100")
RESULT["tpu"] = placed(resources={"tpu_slice": 1})
RESULT["sizes"] = {"half_gpu": pool(num_gpus=0.5).size(), "one_gpu": pool(num_gpus=1).size(),
                   "memory_1.5GiB": pool(memory=int(1.5 * 2**30)).size(), "cpu_only": pool().size()}
RESULT["two_gpus"] = refused(num_gpus=2)
RESULT["l4"] = refused(accelerator_type="L4")
RESULT["memory_3GiB"] = refused(memory=3 * 2**30)
RESULT["two_tpu_slices"] = refused(resources={"tpu_slice": 2})
"""


@pytest.fixture(scope="module")
def outcome(gpu_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shapes")
    source = write_jsonl(str(tmp / "in" / "rows.jsonl"), rows(10))
    return run_driver(gpu_cluster, SCENARIOS, {"source": source, "sink": str(tmp / "out")})


def nodes_of(cluster, placed: dict) -> list[str | None]:
    """The node (its ``ray start``) that started each replica, from the ancestry read while it ran."""
    return [next((name for name, node in cluster.nodes.items() if node.popen.pid in ancestry), None) for ancestry in placed["ancestry"]]


def test_half_a_gpu_puts_two_replicas_on_the_one_h100_node(gpu_cluster, outcome):
    placed = outcome["half_gpu_h100"]
    assert placed["size"] == 2  # 1 GPU / 0.5, and only node a is an H100
    assert len(set(placed["pids"])) == 2  # two replicas alive at once...
    assert nodes_of(gpu_cluster, placed) == ["a", "a"]  # ...both on the H100 node
    assert [(status, rows) for status, rows, _ in placed["shards"]] == [("computed", 10)]  # and they serve
    assert placed["shards"][0][2] in placed["pids"]


def test_a_custom_resource_places_the_replica_on_the_node_that_has_it(gpu_cluster, outcome):
    placed = outcome["tpu"]
    assert placed["size"] == 1
    assert nodes_of(gpu_cluster, placed) == ["b"]
    assert [(status, rows) for status, rows, _ in placed["shards"]] == [("computed", 10)]


def test_the_pool_is_sized_node_by_node(outcome):
    # 0.5 GPU: 2 per node; 1 GPU: 1 per node; 1.5 GiB of 2 GiB: 1 per node; half a CPU: 4 per node.
    assert outcome["sizes"] == {"half_gpu": 4, "one_gpu": 2, "memory_1.5GiB": 2, "cpu_only": 8}


def test_two_gpus_on_nodes_of_one_gpu_are_refused_naming_each_node(outcome):
    message = outcome["two_gpus"]
    assert message is not None, "num_gpus=2 was accepted on two 1-GPU nodes (2 GPUs in the cluster, 1 per node)"
    assert "num_gpus=2" in message and message.count("2 CPU, 1 GPU") == 2
    assert "add a node with these resources" in message


def test_an_accelerator_no_node_has_is_refused_naming_the_nodes_accelerators(outcome):
    message = outcome["l4"]
    assert message is not None and "accelerator_type='L4'" in message
    assert "accelerator_type H100" in message and "no accelerator_type" in message


def test_memory_above_every_node_is_refused(outcome):
    message = outcome["memory_3GiB"]
    assert message is not None and "memory=3221225472 (3.0 GiB)" in message and message.count("2.0 GiB memory") == 2


def test_more_of_a_custom_resource_than_any_node_has_is_refused(outcome):
    message = outcome["two_tpu_slices"]
    assert message is not None and "resources={'tpu_slice': 2}" in message
    assert "1 tpu_slice" in message and "0 tpu_slice" in message


@pytest.mark.parametrize(
    "node, wanted, count",
    [
        ({"CPU": 2, "GPU": 1}, {"CPU": 0.5, "GPU": 0.5}, 2),
        ({"CPU": 16, "GPU": 1}, {"CPU": 1, "GPU": 0.1}, 10),  # 1.0 / 0.1 is 9.999... in floats
        ({"CPU": 8, "GPU": 1}, {"CPU": 1, "GPU": 2}, 0),
        ({"CPU": 8, "GPU": 4}, {"CPU": 1, "GPU": 2}, 2),
        ({"CPU": 8, "accelerator_type:H100": 1}, {"CPU": 1, "accelerator_type:H100": 0.001}, 8),
        ({"CPU": 8}, {"CPU": 1, "accelerator_type:H100": 0.001}, 0),
        ({"CPU": 8, "memory": 4 * GiB}, {"CPU": 1, "memory": 1.5 * GiB}, 2),
        ({"CPU": 8}, {}, 1),
    ],
)
def test_fits_counts_the_replicas_one_node_holds(node, wanted, count):
    assert fits(node, wanted) == count
