"""The generation predictor end to end: `airflow dags test` on a local Ray, a tiny Llama built in the test."""

from __future__ import annotations

import glob
import json
import os
import sqlite3

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
        rows_per_shard=5, batch_size=3, num_replicas=1, num_cpus=1, gpu_hour_price=3.0,
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

    # Counting (docs/counting.md): the tokens the rows hold are each shard's counters, summed in
    # _SUCCESS, in the task log's events and in the sink's Asset event; the price gives a cost.
    tokens = {name: sum(row[name] or 0 for row in rows) for name in ("tokens_in", "tokens_out")}
    sentinels = [json.load(open(path)) for path in glob.glob(os.path.join(spec.checkpoint_root, "shards", "*.json"))]
    assert len(sentinels) == 3
    for sentinel in sentinels:
        counters = sentinel["counters"]
        assert counters["tokens_out"] > 0 and counters["replica_seconds"] >= counters["model_seconds"] > 0
        assert counters["gpu_seconds"] == 0 and sentinel["gpu_hour_price"] == 3.0  # num_gpus=0: no GPU-seconds
    assert {name: sum(s["counters"][name] for s in sentinels) for name in tokens} == tokens
    assert {name: manifest["counters"][name] for name in tokens} == tokens
    assert (manifest["gpu_hour_price"], manifest["cost"]) == (3.0, 0.0)
    done = [e for e in run.events("shard_done") if e["status"] == "computed"]
    assert sum(e["counters"]["tokens_out"] for e in done) == tokens["tokens_out"]
    (result,) = run.events("result")
    assert (result["counters"], result["cost"]) == (manifest["counters"], 0.0)
    db = sqlite3.connect(os.path.join(dag_tester.home, "airflow.db"))
    try:
        [(extra,)] = db.execute("select extra from asset_event order by id desc limit 1").fetchall()
    finally:
        db.close()
    assert json.loads(extra)["counters"] == manifest["counters"] and json.loads(extra)["cost"] == 0.0


def test_a_bad_prompt_is_rejected_not_the_shard(dag_tester, tmp_path):
    """Chat messages that are not valid JSON make the predictor raise on that row: with
    ``bad_rows="skip"`` it lands in ``_rejected/`` and the shard's other rows in the sink."""
    model = build_tiny_llm(tmp_path / "model", behaviour="repeat")
    good = json.dumps([{"role": "user", "content": "hi"}])
    records = [{"id": i, "messages": "[{not json" if i == 4 else good} for i in range(8)]
    write_jsonl(str(tmp_path / "in" / "chats.jsonl"), records)
    spec = make_spec(
        str(tmp_path / "in"), str(tmp_path / "out"), predictor=PREDICTOR, bad_rows="skip",
        predictor_kwargs={"model": model, "messages_column": "messages", "max_new_tokens": 2},
        rows_per_shard=8, batch_size=8, num_replicas=1, num_cpus=1,
    )
    run = dag_tester.run(spec)
    assert run.state == "success", run.output[-3000:]
    table = sink_table(spec.sink_root)
    assert table.column("id").to_pylist() == [0, 1, 2, 3, 5, 6, 7]
    assert set(table.column("generated_text").to_pylist()) == {"aa"}
    rejected = [json.loads(line) for path in glob.glob(os.path.join(spec.sink_root, "_rejected", "*.jsonl"))
                for line in open(path)]
    assert [r["row"]["id"] for r in rejected] == [4], rejected
    assert "Expecting" in rejected[0]["error"], rejected  # json's own message about the row's messages
    manifest = json.load(open(os.path.join(spec.sink_root, "_SUCCESS")))
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (8, 7, 1)
