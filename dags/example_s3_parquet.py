"""Score a Parquet feature table on S3 with a logistic model, into Parquet on S3.

Reads ``s3://…/features/*.parquet`` row group by row group on the model's replicas, writes one part
per shard next to nothing else, and commits each shard with a conditional PUT of its
sentinel: no rename or copy on S3, and a rerun computes only what is not committed.

Credentials come from the amazon provider's ``aws`` connection named by ``BATCH_S3_CONN_ID``
(default ``aws_default``; needs ``pip install 'airflow-batch-provider[s3]'``): login/password =
access key/secret, extra ``endpoint_url`` and ``region_name`` for S3-compatible stores (and
``role_arn``, ``profile_name``, ``aws_session_token`` as for any aws connection), e.g.::

    export AIRFLOW_CONN_AWS_DEFAULT='{"conn_type": "aws", "login": "...", "password": "...",
        "extra": {"endpoint_url": "http://127.0.0.1:8333", "region_name": "us-east-1"}}'

Paths come from the environment, so the same file serves tests and a deployment.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import dag

from airflow_batch_provider import BatchSpec, batch_inference

BUCKET = os.environ.get("BATCH_S3_BUCKET", "batch-inference-example")

spec = BatchSpec(
    source=os.environ.get("BATCH_S3_SOURCE", f"s3://{BUCKET}/features/"),
    sink=os.environ.get("BATCH_S3_SINK", f"s3://{BUCKET}/scores"),
    source_format="parquet",
    sink_format="parquet",
    predictor="airflow_batch_provider.predictors.linear:LinearModel",
    predictor_kwargs={
        "weights": {"tenure_months": -0.04, "monthly_spend": 0.012, "support_tickets": 0.35},
        "intercept": -1.2,
        "link": "logistic",
        "output_column": "churn_probability",
        "keep_columns": ["customer_id"],
    },
    columns=["customer_id", "tenure_months", "monthly_spend", "support_tickets"],
    batch_size=int(os.environ.get("BATCH_S3_BATCH_SIZE", "4096")),
    rows_per_shard=int(os.environ.get("BATCH_S3_ROWS_PER_SHARD", "100000")),
    num_cpus=float(os.environ.get("BATCH_S3_NUM_CPUS", "1")),
    storage_conn_id=os.environ.get("BATCH_S3_CONN_ID", "aws_default"),
)


@dag(
    dag_id="batch_inference_s3_parquet",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["batch-inference", "example", "s3"],
    doc_md=__doc__,
)
def batch_inference_s3_parquet():
    batch_inference(spec, group_id="score", max_active_shards=int(os.environ.get("BATCH_S3_MAX_ACTIVE", "2")))


batch_inference_s3_parquet()
