"""Test DAGs for the deployment tests; copied into the deployment's DAGs folder.

Each entry of ``deploy_dags.json`` beside this file becomes one DAG that runs
``batch_inference(...)`` with ``tests.predictors.SlowDoubler`` (counts its calls in a file).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_batch_provider import BatchSpec, batch_inference

HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(HERE, "deploy_dags.json")) as handle:
    CONFIGS = json.load(handle)

for cfg in CONFIGS:
    spec = BatchSpec(
        source=cfg["source"],
        sink=cfg["sink"],
        predictor="tests.predictors:SlowDoubler",
        predictor_kwargs=cfg["predictor_kwargs"],
        batch_size=cfg.get("batch_size", 5),
        rows_per_shard=cfg.get("rows_per_shard", 10),
        num_cpus=1,
        num_replicas=cfg.get("num_replicas", 2),
        resume=cfg.get("resume", True),
    )
    with DAG(
        dag_id=cfg["dag_id"],
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        tags=["deployment-test"],
    ) as dag:
        batch_inference(
            spec,
            group_id="batch",
            shard_retries=cfg.get("retries", 2),
            max_active_shards=cfg.get("max_active_shards"),
            pool=cfg.get("pool"),
            deferrable=cfg.get("deferrable"),
            shard_kwargs={
                "retry_delay": timedelta(seconds=cfg.get("retry_delay_s", 1)),
                "poll_interval": cfg.get("poll_interval", 1.0),
            },
        )
    globals()[cfg["dag_id"]] = dag
