"""``airflow dags test`` through Ray Client: the ``ray_batch`` connection's host is the head's
``ray://`` address and its password the token, as for an Airflow deployment outside the
cluster's network. Both shard task modes run: in the task (sync) and deferred (the trigger
follows the call through the task process's own Ray Client connection)."""

from __future__ import annotations

import json

import pytest

from airflow_batch_provider import BatchSpec
from tests.helpers import rows, sink_ids, write_jsonl
from tests.integration.dagtest import DagTester
from tests.ray_cluster import RayCluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    ray = RayCluster("clientdag", head_cpus=1).start()
    try:
        ray.wait_nodes(1)
        yield ray
    finally:
        ray.stop()


@pytest.mark.parametrize("deferrable", [False, True], ids=["sync", "deferred"])
def test_a_dag_runs_through_a_ray_client_connection(cluster, tmp_path, deferrable):
    source = write_jsonl(str(tmp_path / "in" / "rows.jsonl"), rows(40))
    spec = BatchSpec(source=source, source_format="jsonl", sink=str(tmp_path / "out"), predictor="tests.predictors:SlowDoubler",
                     predictor_kwargs={"sleep_s": 0.5}, rows_per_shard=20, batch_size=10, num_cpus=1, num_replicas=1)
    conn = json.dumps({"conn_type": "ray_batch", "host": cluster.client_address, "password": cluster.token})
    tester = DagTester(str(tmp_path / "airflow"), connections={"ray_batch_default": conn}, group_kwargs=f", deferrable={deferrable}")
    run = tester.run(spec, extra_env={"RAY_ADDRESS": ""})  # the connection alone names the cluster
    assert run.state == "success", run.output[-6000:]
    assert f"Connected to Ray at {cluster.client_address}" in run.output
    assert ("Deferring while Ray computes" in run.output) is deferrable
    assert sink_ids(spec.sink_root) == list(range(40))
    assert cluster.token not in run.output and not tester.files_containing(cluster.token)
