"""Test DAGs for the partitioned-asset scenario; copied into the deployment's DAGs folder.

``partitions_daily`` writes ``out/{{ ds }}`` (a plain, unpartitioned DAG run: the event names
the rendered partition); ``partitions_runtime`` is a partitioned DAG (``PartitionedAtRuntime``,
triggered with a partition key) writing ``out_rt/{{ dag_run.conf['day'] }}`` (the event carries
the run's key). A downstream DAG on each sink's asset (``PartitionedAssetTimetable``) writes
what its run sees to ``seen/<dag_id>/<partition key>.json``.
"""

from __future__ import annotations

import json
import os

import pendulum
from airflow.sdk import DAG, PartitionedAssetTimetable, PartitionedAtRuntime, task

from airflow_batch_provider import BatchSpec, batch_inference
from airflow_batch_provider.task_group import sink_asset

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "partitions")
START = pendulum.datetime(2026, 1, 1, tz="UTC")


def spec(sink: str) -> BatchSpec:
    return BatchSpec(
        source=os.path.join(DATA, "in", "*.jsonl"), sink=sink, predictor="tests.predictors:SlowDoubler",
        predictor_kwargs={"sleep_s": 0.0}, batch_size=10, rows_per_shard=10, num_cpus=1, num_replicas=1,
    )


@task
def record(dag_run=None, triggering_asset_events=None):
    """What a downstream run sees: its partition key, and the sink path on the triggering event."""
    sinks = sorted(e.extra.get("sink", "") for events in (triggering_asset_events or {}).values() for e in events)
    path = os.path.join(DATA, "seen", dag_run.dag_id, f"{dag_run.partition_key}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"partition_key": dag_run.partition_key, "sinks": sinks}, handle)


for upstream, schedule, sink in (
    ("partitions_daily", None, os.path.join(DATA, "out", "{{ ds }}")),
    ("partitions_runtime", PartitionedAtRuntime(), os.path.join(DATA, "out_rt", "{{ dag_run.conf['day'] }}")),
):
    job = spec(sink)
    with DAG(dag_id=upstream, schedule=schedule, start_date=START, catchup=False, tags=["deployment-test"]) as dag:
        batch_inference(job, group_id="batch", max_active_shards=1)
    globals()[upstream] = dag
    with DAG(dag_id=f"{upstream}_downstream", schedule=PartitionedAssetTimetable(assets=sink_asset(job)), start_date=START,
             catchup=False, tags=["deployment-test"]) as dag:
        record()
    globals()[f"{upstream}_downstream"] = dag
