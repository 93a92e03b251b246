"""OpenAIChat end to end: `airflow dags test` on a local Ray against the loopback server, the API
key given as ``predictor_secrets={"api_key": "var:..."}``: a 400 row rejected under skip, 429s and
500s ridden out, every other row sent once, and the key nowhere in the run's output or task logs."""

from __future__ import annotations

import json
import os

import pytest

from airflow_batch_provider import BatchSpec
from tests.helpers import sink_table, write_jsonl
from tests.integration.dagtest import DagTester
from tests.openai_server import FakeOpenAI

pytestmark = pytest.mark.slow

KEY = "sk-dag-hosted-key-5f4e3d2c1b0a9988"


def test_hosted_chat_through_airflow_dags_test(tmp_path):
    records = [{"id": i, "prompt": ("BAD " if i == 7 else "RATE2 " if i == 30 else "E500x1 " if i == 55 else "") + f"prompt {i}"}
               for i in range(90)]
    write_jsonl(str(tmp_path / "in" / "p.jsonl"), records)
    with FakeOpenAI(api_key=KEY, latency_s=0.01, retry_after="0.5") as server:
        spec = BatchSpec(
            source=str(tmp_path / "in" / "*.jsonl"), sink=str(tmp_path / "out"),
            predictor="airflow_batch_provider.predictors.openai_compatible:OpenAIChat",
            predictor_kwargs={"base_url": server.url, "model": "m", "keep_columns": ["id"], "max_tokens": 16,
                              "max_concurrency": 4, "backoff_first_s": 0.1},
            predictor_secrets={"api_key": "var:hosted_model_key"}, bad_rows="skip", rows_per_shard=45, batch_size=16,
        )
        tester = DagTester(str(tmp_path / "home"), dag_id="abp_hosted")
        run = tester.run(spec, extra_env={"AIRFLOW_VAR_HOSTED_MODEL_KEY": KEY})
        assert run.state == "success", run.output[-4000:]
        tries = dict(server.tries)
    manifest = json.load(open(tmp_path / "out" / "_SUCCESS"))
    assert manifest["rows_out"] == 89 and manifest["rows_rejected"] == 1
    table = sink_table(str(tmp_path / "out"))
    assert table.column("id").to_pylist() == [i for i in range(90) if i != 7]
    texts = dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))
    assert texts[30] == "echo: RATE2 prompt 30" and texts[0] == "echo: prompt 0"
    assert set(table.column("finish_reason").to_pylist()) == {"stop"} and min(table.column("tokens_out").to_pylist()) == 3
    folder = tmp_path / "out" / "_rejected"
    rejected = [json.loads(line) for name in os.listdir(folder) if name.endswith(".jsonl") for line in open(folder / name)]
    assert [r["row"]["id"] for r in rejected] == [7] and "HTTP 400: prompt rejected" in rejected[0]["error"]
    assert tries["RATE2 prompt 30"] == 3 and tries["E500x1 prompt 55"] == 2
    assert all(n == 1 for prompt, n in tries.items() if "RATE" not in prompt and "E500" not in prompt)  # none re-sent
    assert KEY not in run.output
    assert tester.files_containing(KEY) == []  # task logs, XCom, rendered fields: the reference only
