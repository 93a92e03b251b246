"""Replicas of several GPUs, and GPUs shared by replicas, on a real Ray node of 4 virtual GPUs:
Ray hands each replica its own GPU ids (``CUDA_VISIBLE_DEVICES``), and the pool sizes by them."""

from __future__ import annotations

import pytest

from tests.core.ray.conftest import run_driver
from tests.helpers import rows, write_jsonl
from tests.ray_cluster import RayCluster

pytestmark = pytest.mark.slow

SCENARIOS = """
import ray
from airflow_batch_provider.core.api import new_attempt, plan
from airflow_batch_provider.core.ray.pool import ReplicaPool, find_replica
from airflow_batch_provider.core.spec import JobSpec

def placed(num_gpus):
    replicas = ReplicaPool(JobSpec(source=ARGS["source"], source_format="jsonl", sink=ARGS["sink"] + str(num_gpus),
                                   predictor="tests.predictors:Doubler", num_cpus=0.25, num_gpus=num_gpus))
    try:
        names = replicas.start(wanted=replicas.size())
        infos = ray.get([find_replica(name).info.remote() for name in names], timeout=240)  # all alive at once
        results = replicas.result(replicas.submit(plan(replicas.spec).pending, new_attempt()))
        return {"size": replicas.size(), "gpu_ids": sorted(sorted(info["gpu_ids"]) for info in infos),
                "statuses": [r["status"] for r in results]}
    finally:
        replicas.shutdown(force=True)

RESULT["two"] = placed(2)
RESULT["half"] = placed(0.5)
"""


@pytest.fixture(scope="module")
def four_gpu_node():
    cluster = RayCluster("multigpu").start()
    try:
        cluster.add_node("quad", cpus=2, gpus=4)
        yield cluster
    finally:
        cluster.stop()


def test_multi_gpu_replicas_get_their_own_gpus_and_half_gpu_replicas_share_them(four_gpu_node, tmp_path):
    source = write_jsonl(str(tmp_path / "in" / "rows.jsonl"), rows(10))
    outcome = run_driver(four_gpu_node, SCENARIOS, {"source": source, "sink": str(tmp_path / "out")})
    two = outcome["two"]
    assert two["size"] == 2 and two["statuses"] == ["computed"]
    assert all(len(ids) == 2 for ids in two["gpu_ids"])  # two GPUs each...
    assert sorted(sum(two["gpu_ids"], [])) == ["0", "1", "2", "3"]  # ...none shared
    half = outcome["half"]
    assert half["size"] == 8 and half["statuses"] == ["computed"]
    assert all(len(ids) == 1 for ids in half["gpu_ids"])
    assert sorted(sum(half["gpu_ids"], [])) == sorted(["0", "1", "2", "3"] * 2)  # two replicas on each GPU
