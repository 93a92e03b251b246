"""The DAG ``make bench-scale`` runs: an identity predictor over generated rows, read -> write.

Everything comes from the environment (``benchmarks/scale.py`` sets it), so one file serves the
local and the S3 runs and every size.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import dag

from airflow_batch_provider import BatchSpec, batch_inference

spec = BatchSpec(
    source=os.environ.get("SCALE_SOURCE", "/tmp/abp-scale/in/*.jsonl"),
    sink=os.environ.get("SCALE_SINK", "/tmp/abp-scale/out"),
    predictor="benchmarks.identity:Identity",
    batch_size=int(os.environ.get("SCALE_BATCH_SIZE", "65536")),
    batch_format="pyarrow",
    rows_per_shard=int(os.environ.get("SCALE_ROWS_PER_SHARD", "250000")),
    num_cpus=float(os.environ.get("SCALE_NUM_CPUS", "1")),
    storage_conn_id=os.environ.get("SCALE_CONN_ID") or None,
)


@dag(dag_id="batch_scale", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def batch_scale():
    batch_inference(
        spec,
        group_id="scale",
        max_active_shards=int(os.environ.get("SCALE_MAX_ACTIVE", "2")),
        shards_per_task=int(os.environ.get("SCALE_DAG_SHARDS_PER_TASK", "1")),
    )


batch_scale()
