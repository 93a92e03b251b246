"""The replica pool on an autoscaling Ray cluster: Ray's real autoscaler (v2) and its fake
multi-node provider, whose GPU node type (1 CPU, 1 virtual GPU) sits at 0 nodes until a
replica asks for one (``tests/autoscaling_cluster.py``).

The tests run in file order on one cluster: the GPU job grows it from 0 to 2 nodes, the
infeasible replica fails while they may still be up, and the idle replica's exit lets the
autoscaler remove its node."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import ray

from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import plan_job
from airflow_batch_provider.core.errors import ResourcesUnavailableError
from airflow_batch_provider.core.ray import leases
from airflow_batch_provider.core.ray.connection import NAMESPACE
from airflow_batch_provider.core.ray.node_types import read_outlook
from airflow_batch_provider.core.ray.pool import ReplicaPool
from tests.autoscaling_cluster import AutoscalingRayCluster, gpu_node_type
from tests.helpers import make_spec

#: a launched node idle this long is removed by the autoscaler
NODE_IDLE_S = 6.0


def gpu_nodes() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive") and node["Resources"].get("GPU"))


def wait_until(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def autoscaling_ray():
    cluster = AutoscalingRayCluster(label="autoscale", node_types={"gpu": gpu_node_type(gpus=1, cpus=1, max_workers=2)},
                                    idle_timeout_s=NODE_IDLE_S)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    try:
        cluster.start()
        cluster.connect(NAMESPACE)
        yield cluster
    finally:
        cluster.disconnect(saved)
        cluster.stop()


def test_gpu_job_runs_on_nodes_the_autoscaler_adds(autoscaling_ray, jsonl_source, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(leases, "WAITING_REPORT_S", 2.0)
    # a few seconds a shard: the second node joins while the first replica still computes
    spec = make_spec(jsonl_source, str(tmp_path / "out"), num_gpus=1, num_cpus=1, num_replicas=2,
                     predictor="tests.predictors:SlowDoubler", predictor_kwargs={"sleep_s": 1.5})
    pending = plan_job(spec).pending
    assert gpu_nodes() == 0 and read_outlook().autoscaler == "v2"
    pool = ReplicaPool(spec, node_wait_timeout_s=120)
    seen: list[tuple[float, int, int]] = []  # (s, replicas up, GPU nodes)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            states = pool.replica_states()
            seen.append((time.monotonic() - started, sum(s == "ALIVE" for s in states.values()), gpu_nodes()))
            stop.wait(0.5)

    started = time.monotonic()
    results: list = []
    errors: list = []

    def run(shards) -> None:
        try:
            work = pool.submit(shards, new_attempt())
            results.extend(pool.result(work))
        except Exception as err:  # reported by the assertion below
            errors.append(err)

    try:
        with caplog.at_level(logging.INFO, logger=leases.__name__):
            assert len(pool.start(wanted=len(pending))) == 2  # capped by num_replicas; asks the autoscaler at once
            threading.Thread(target=sample, daemon=True).start()
            workers = [threading.Thread(target=run, args=(pending[i::2],)) for i in range(2)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(timeout=150)
        assert not errors, errors
        assert sorted(r["status"] for r in results) == ["computed"] * len(pending)
        assert max(up for _, up, _ in seen) == 2 and max(nodes for _, _, nodes in seen) == 2  # grew from 0 to 2 nodes
        assert seen[0][1] == 0
        assert any("waiting for a node with 1 CPU, 1 GPU" in r.getMessage() and "replicas up" in r.getMessage() for r in caplog.records)
    finally:
        stop.set()
        pool.shutdown(force=True)


def test_replica_no_node_type_holds_fails_in_seconds(autoscaling_ray, jsonl_source, tmp_path):
    spec = make_spec(jsonl_source, str(tmp_path / "out"), num_gpus=4, num_cpus=1)
    pool = ReplicaPool(spec, node_wait_timeout_s=120)
    started = time.monotonic()
    try:
        with pytest.raises(ResourcesUnavailableError) as err:
            pool.submit(plan_job(spec).pending[:1], new_attempt(), lease_timeout_s=60)
        assert time.monotonic() - started < 30
        message = str(err.value)
        assert "num_gpus=4" in message and "no node type can hold one" in message and "Node types:" in message
        assert pool.replica_states() == {}  # the replica that asked is not left waiting for a node forever
    finally:
        pool.shutdown(force=True)


def test_idle_replica_exits_and_the_autoscaler_removes_its_node(autoscaling_ray, jsonl_source, tmp_path):
    wait_until(lambda: gpu_nodes() == 0, 60, "the earlier tests' nodes to be removed")
    spec = make_spec(jsonl_source, str(tmp_path / "out"), num_gpus=1, num_cpus=1, num_replicas=1)
    pool = ReplicaPool(spec, idle_timeout_s=3.0, node_wait_timeout_s=120)
    try:
        results = pool.result(pool.submit(plan_job(spec).pending[:1], new_attempt()))
        assert [r["status"] for r in results] == ["computed"]
        assert gpu_nodes() == 1
        done = time.monotonic()
        exited = wait_until(lambda: pool.replica_states() == {}, 30, "the idle replica to exit")
        removed = wait_until(lambda: gpu_nodes() == 0, 60, "the autoscaler to remove the idle node")
        assert exited < 15 and time.monotonic() - done < 3.0 + NODE_IDLE_S + 30
        assert removed >= 0
    finally:
        pool.shutdown(force=True)


#: a process outside the cluster's network: Ray Client, the token in the target only
THROUGH_RAY_CLIENT = """
import json, sys
from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import plan_job
from airflow_batch_provider.core.ray.connection import RayTarget, connect
from airflow_batch_provider.core.ray.node_types import read_outlook
from airflow_batch_provider.core.ray.pool import ReplicaPool
from airflow_batch_provider.core.spec import JobSpec

address, token, source, sink = sys.argv[1:5]
connect(RayTarget(address=address, token=token), timeout_s=60)
outlook = read_outlook()
spec = JobSpec(source=source, source_format="jsonl", sink=sink, predictor="tests.predictors:Doubler", num_gpus=1, num_cpus=1, num_replicas=1)
pool = ReplicaPool(spec, node_wait_timeout_s=120)
try:
    results = pool.result(pool.submit(plan_job(spec).pending[:1], new_attempt()))
finally:
    pool.shutdown(force=True)
print("RESULT " + json.dumps({"autoscaler": outlook.autoscaler, "status": [r["status"] for r in results]}))
"""


def test_through_ray_client_a_gpu_group_at_zero_is_waited_for_not_refused(autoscaling_ray, jsonl_source, tmp_path):
    """A Ray Client process cannot read the autoscaler's state itself (no GCS client): it is read
    on the cluster, so a GPU job from outside the cluster waits for the node as one inside does."""
    import json
    import subprocess
    import sys

    wait_until(lambda: gpu_nodes() == 0, 60, "the earlier tests' nodes to be removed")
    env = {k: v for k, v in autoscaling_ray.driver_env().items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    out = subprocess.run([sys.executable, "-c", THROUGH_RAY_CLIENT, f"ray://127.0.0.1:{autoscaling_ray.client_port}",
                          autoscaling_ray.token, jsonl_source, str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=240)
    line = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
    assert out.returncode == 0 and line, out.stdout[-3000:] + out.stderr[-5000:]
    assert json.loads(line[len("RESULT "):]) == {"autoscaler": "v2", "status": ["computed"]}
