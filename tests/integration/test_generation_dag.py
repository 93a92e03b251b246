"""The generation predictor end to end: `airflow dags test` on a local Ray, a tiny Llama built in the test."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from airflow_batch_provider.core.execution.batches import from_batch, to_batch
from airflow_batch_provider.predictors.generation import TextGenerator
from tests.helpers import make_spec, sink_table, write_jsonl
from tests.tiny_llm import build_tiny_llm

pytestmark = pytest.mark.slow

PREDICTOR = "airflow_batch_provider.predictors.generation:TextGenerator"


def test_generation_dag_writes_every_row_once(dag_tester, tmp_path):
    model = build_tiny_llm(tmp_path / "model")
    records = [{"id": i, "text": None if i % 5 == 3 else f"row {i} says hi"} for i in range(12)]
    write_jsonl(str(tmp_path / "in" / "prompts.jsonl"), records)
    kwargs = {"model": model, "prompt_template": "Summarise: {text}", "keep_columns": ["id"], "max_new_tokens": 4}
    spec = make_spec(
        str(tmp_path / "in"), str(tmp_path / "out"), predictor=PREDICTOR, predictor_kwargs=kwargs,
        rows_per_shard=5, batch_size=3, num_replicas=1, num_cpus=1,
    )
    run = dag_tester.run(spec)
    assert run.state == "success", run.output[-3000:]
    assert run.plan_counts() == (3, 0, 3)

    table = sink_table(spec.sink_root)
    assert table.column("id").to_pylist() == list(range(12))  # every row, once
    manifest = json.load(open(os.path.join(spec.sink_root, "_SUCCESS")))
    assert (manifest["rows_in"], manifest["rows_out"]) == (12, 12)
    rows = table.to_pylist()
    for row in rows:
        if row["id"] % 5 == 3:
            assert (row["generated_text"], row["tokens_in"], row["finish_reason"]) == (None, None, None)
        else:
            assert row["tokens_in"] == len(f"Summarise: row {row['id']} says hi") + 1
            assert row["finish_reason"] in ("stop", "length") and 1 <= row["tokens_out"] <= 4
    # greedy decoding on the replica gives what the predictor gives here
    direct = from_batch(TextGenerator(**kwargs)(to_batch(pa.Table.from_pylist(records), "numpy")), "numpy")
    assert rows == direct.to_pylist()
