"""A linear (logistic) scoring model over numeric columns: ``predictors.linear:LinearModel``.

Run it from the repository root: ``python docs/examples/linear.py [work_dir]``. It writes a small JSONL
input under a temporary directory, runs the job on a local Ray (plan, the shards on a model
replica, finalize: what ``batch_inference(spec)``'s three tasks do in a DAG), and checks the
sink. In a DAG the same ``BatchSpec`` goes to ``batch_inference(spec)``; see
docs/predictors.md#linearmodel.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile

import pyarrow.dataset as ds

from airflow_batch_provider import BatchSpec
from airflow_batch_provider.core import api


def run_job(spec: BatchSpec) -> dict:
    """What the DAG's plan, shard and finalize tasks do, in this process, on a local Ray."""
    core = spec.core()
    api.connect()  # no address: starts a local Ray (a DAG's tasks use the `ray` connection's cluster)
    pool = api.ReplicaPool(core)  # the model replicas: each builds the predictor once
    try:
        pending = api.plan(core).pending  # the shards not committed yet
        for result in pool.result(pool.submit(pending, api.new_attempt())) if pending else []:
            print(f"shard {result['shard_id']}: {result['status']}, {result['rows_in']} rows in, {result['rows_out']} out")
    finally:
        pool.shutdown(force=True)  # in a DAG, finalize releases them (or they exit when idle)
    return api.finalize(core)  # checks every shard is committed, writes _SUCCESS


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="abp-example-linear-")
    source = os.path.join(work, "applicants.jsonl")
    with open(source, "w") as handle:
        for i in range(300):
            handle.write(json.dumps({"id": i, "income": 20 + i % 50, "debt": i % 7}) + "\n")

    spec = BatchSpec(
        source=source,
        sink=os.path.join(work, "scores"),
        predictor="airflow_batch_provider.predictors.linear:LinearModel",
        predictor_kwargs={"weights": {"income": 0.05, "debt": -0.4}, "intercept": -1.0,
                          "link": "logistic", "output_column": "p_repay", "keep_columns": ["id"]},
        batch_size=64,
        rows_per_shard=100,
        num_cpus=1,
        num_replicas=1,
    )
    manifest = run_job(spec)

    table = ds.dataset(spec.sink, format="parquet").to_table().sort_by("id")
    print(f"{manifest['rows_out']} rows in {spec.sink}, columns {table.column_names}")
    print(table.slice(0, 3).to_pylist())
    assert table.column_names == ["id", "p_repay"]
    assert table.column("id").to_pylist() == list(range(300))
    first = 1 / (1 + math.exp(-(-1.0 + 0.05 * 20 - 0.4 * 0)))
    assert abs(table.column("p_repay")[0].as_py() - first) < 1e-12
    print("example ok")


if __name__ == "__main__":
    sys.exit(main())
