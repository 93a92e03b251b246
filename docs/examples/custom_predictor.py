"""Your own predictor class, shipped to the replicas with ``runtime_env``.

Run it from the repository root: ``python docs/examples/custom_predictor.py [work_dir]``. The
predictor, ``KeywordTagger`` in ``docs/examples/my_predictor/keyword_tagger.py``, is on no
path of the Ray workers: ``runtime_env={"working_dir": <that directory>}`` uploads it, and each
replica imports ``keyword_tagger`` from there (on a real cluster you may instead install it in
the nodes' image). It reads pandas batches, keeps null texts as nulls, filters out rows
without a keyword, and fails over-long texts one row at a time with ``RowsFailed``, which
``bad_rows="skip"`` sends to ``_rejected/``. The job runs on a local Ray (plan, the shards on
a model replica, finalize: what ``batch_inference(spec)``'s three tasks do in a DAG). See
docs/predictors.md#your-own-predictor.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile

import pyarrow.dataset as ds

from airflow_batch_provider import BatchSpec
from airflow_batch_provider.core import api

CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "my_predictor")


def run_job(spec: BatchSpec) -> dict:
    """What the DAG's plan, shard and finalize tasks do, in this process, on a local Ray."""
    core = spec.core()
    api.connect()  # no address: starts a local Ray (a DAG's tasks use the `ray` connection's cluster)
    pool = api.ReplicaPool(core)  # the model replicas: each builds the predictor once
    try:
        pending = api.plan(core).pending  # the shards not committed yet
        for result in pool.result(pool.submit(pending, api.new_attempt())) if pending else []:
            print(f"shard {result['shard_id']}: {result['status']}, {result['rows_in']} rows in, "
                  f"{result['rows_out']} out, {result['rows_rejected']} rejected, on replica pid {result['worker_pid']}")
    finally:
        pool.shutdown(force=True)  # in a DAG, finalize releases them (or they exit when idle)
    return api.finalize(core)  # checks every shard is committed, writes _SUCCESS


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="abp-example-custom-")
    lexicon = os.path.join(work, "lexicon.json")  # the "model" file; on a cluster: a path every node can read
    with open(lexicon, "w") as handle:
        json.dump({"weather": ["rain", "sun", "storm"], "sport": ["match", "goal"]}, handle)
    texts = ["rain and storm tonight", "a late goal won the match", "nothing to see", None, "x" * 300]
    source = os.path.join(work, "posts.jsonl")
    with open(source, "w") as handle:
        for i in range(30):
            handle.write(json.dumps({"id": i, "text": texts[i % 5]}) + "\n")

    spec = BatchSpec(
        source=source,
        sink=os.path.join(work, "tags"),
        predictor="keyword_tagger:KeywordTagger",
        predictor_kwargs={"lexicon": lexicon, "min_hits": 1, "max_chars": 200, "model_version": 1},
        batch_format="pandas",
        runtime_env={"working_dir": CODE},  # or install the module on the nodes
        bad_rows="skip",
        max_bad_rows=0.25,
        batch_size=8,
        rows_per_shard=15,
        num_cpus=1,
        num_replicas=1,
    )
    manifest = run_job(spec)

    table = ds.dataset(spec.sink, format="parquet").to_table().sort_by("id")
    print(f"{manifest['rows_in']} rows in, {manifest['rows_out']} out, {manifest['rows_rejected']} rejected; "
          f"schema {table.schema.to_string(show_schema_metadata=False)!r}")
    for row in table.slice(0, 3).to_pylist():
        print(row)
    by_id = {row["id"]: row for row in table.to_pylist()}
    assert sorted(by_id) == [i for i in range(30) if i % 5 in (0, 1, 3)]  # "nothing to see" filtered out, long texts rejected
    assert by_id[0] == {"id": 0, "tags": ["weather"], "hits": 2}
    assert by_id[1] == {"id": 1, "tags": ["sport"], "hits": 2}
    assert by_id[3] == {"id": 3, "tags": None, "hits": None}  # the null text
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (30, 18, 6)
    rejected = [json.loads(line) for name in glob.glob(os.path.join(spec.sink, "_rejected", "*.jsonl")) for line in open(name)]
    assert sorted(r["line"] for r in rejected) == [i + 1 for i in range(30) if i % 5 == 4]
    assert all("at most max_chars=200" in r["error"] for r in rejected), rejected[0]
    print("rejected:", rejected[0]["line"], rejected[0]["error"][-60:])
    print("example ok")


if __name__ == "__main__":
    sys.exit(main())
