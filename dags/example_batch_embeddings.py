"""Embed a JSONL text corpus into Parquet with all-MiniLM-L6-v2, shard by shard, on Ray.

``make demo`` generates the corpus and runs this DAG twice with ``airflow dags test``; the
second run finds every shard committed and computes nothing. Paths come from the
environment so the same file serves the demo, the tests and a real deployment.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import dag

from airflow_batch_provider import BatchSpec, batch_inference

DEMO_DIR = os.environ.get("BATCH_DEMO_DIR", "/tmp/airflow-batch-demo")

spec = BatchSpec(
    source=os.environ.get("BATCH_DEMO_SOURCE", f"{DEMO_DIR}/corpus/*.jsonl"),
    sink=os.environ.get("BATCH_DEMO_SINK", f"{DEMO_DIR}/embeddings"),
    predictor="airflow_batch_provider.predictors.sentence_embedding:SentenceEmbedder",
    predictor_kwargs={"text_column": "text", "keep_columns": ["id"]},
    batch_size=int(os.environ.get("BATCH_DEMO_BATCH_SIZE", "64")),
    rows_per_shard=int(os.environ.get("BATCH_DEMO_ROWS_PER_SHARD", "1000")),
    num_cpus=float(os.environ.get("BATCH_DEMO_NUM_CPUS", str(min(2, os.cpu_count() or 1)))),
    num_gpus=float(os.environ.get("BATCH_DEMO_NUM_GPUS", "0")),
)


@dag(
    dag_id="batch_inference_example",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["batch-inference", "example"],
    doc_md=__doc__,
)
def batch_inference_example():
    batch_inference(
        spec,
        group_id="embed",
        max_active_shards=int(os.environ.get("BATCH_DEMO_MAX_ACTIVE", "2")),
        progress_interval=float(os.environ.get("BATCH_DEMO_PROGRESS_S", "30")),
    )


batch_inference_example()
