"""The replica pool under Ray's v1 autoscaler (the cluster launcher's default), which publishes
that it runs but not its node types nor which requests none can hold: a GPU job waits for the
node it adds, and a replica no node type holds fails at ``node_wait_timeout_s``, saying what it
waited for (``test_autoscaling.py`` has the v2 autoscaler, which says so in seconds)."""

from __future__ import annotations

import os
import time

import pytest

from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import plan_job
from airflow_batch_provider.core.errors import RayWorkError, ResourcesUnavailableError
from airflow_batch_provider.core.ray.connection import NAMESPACE
from airflow_batch_provider.core.ray.node_types import read_outlook
from airflow_batch_provider.core.ray.pool import ReplicaPool
from tests.autoscaling_cluster import AutoscalingRayCluster, gpu_node_type
from tests.helpers import make_spec


@pytest.fixture(scope="module")
def autoscaling_ray_v1():
    cluster = AutoscalingRayCluster(label="autoscale-v1", node_types={"gpu": gpu_node_type(gpus=1, cpus=1, max_workers=1)},
                                    idle_timeout_s=5.0, autoscaler_v2=False)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    try:
        cluster.start()
        cluster.connect(NAMESPACE)
        yield cluster
    finally:
        cluster.disconnect(saved)
        cluster.stop()


def test_gpu_job_waits_for_the_node_the_v1_autoscaler_adds(autoscaling_ray_v1, jsonl_source, tmp_path):
    outlook = read_outlook()
    assert outlook.autoscaler == "v1" and not outlook.node_types
    spec = make_spec(jsonl_source, str(tmp_path / "out"), num_gpus=1, num_cpus=1, num_replicas=1)
    pool = ReplicaPool(spec, node_wait_timeout_s=120)
    try:
        pending = plan_job(spec).pending
        assert len(pool.start(wanted=len(pending))) == 1  # not refused: the autoscaler may add the node
        results = pool.result(pool.submit(pending, new_attempt()))
        assert sorted(r["status"] for r in results) == ["computed"] * len(pending)
    finally:
        pool.shutdown(force=True)


def test_replica_no_node_type_holds_fails_at_the_node_wait_deadline(autoscaling_ray_v1, jsonl_source, tmp_path):
    spec = make_spec(jsonl_source, str(tmp_path / "out"), num_gpus=4, num_cpus=1)
    pool = ReplicaPool(spec, node_wait_timeout_s=8)
    started = time.monotonic()
    try:
        with pytest.raises(RayWorkError) as err:
            pool.submit(plan_job(spec).pending[:1], new_attempt())
        assert not isinstance(err.value, ResourcesUnavailableError) and err.value.retryable
        assert 8 <= time.monotonic() - started < 30
        message = str(err.value)
        assert "waiting for a node with 1 CPU, 4 GPU" in message and "0 of 1 replicas up" in message
        assert "node_wait_timeout_s=8" in message
    finally:
        pool.shutdown(force=True)
