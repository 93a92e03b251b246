"""OpenAIChat / OpenAIEmbeddings against a real HTTP server on loopback (``tests/openai_server.py``):
answers with usage, 429 with Retry-After, 500s, slow answers past the timeout, a connection
dropped mid-answer, a 400 for one prompt; and through the runner under both bad-row policies."""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pyarrow as pa
import pytest

from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.errors import PredictorFailedError, PredictorUnavailableError, RowsFailed
from airflow_batch_provider.core.execution.runner import ShardRunner
from airflow_batch_provider.predictors.openai_compatible import OpenAIChat, OpenAIEmbeddings
from tests.helpers import make_spec, sink_table, write_jsonl
from tests.openai_server import FakeOpenAI

KEY = "sk-test-hosted-0123456789abcdef"
FAST = {"backoff_first_s": 0.05, "backoff_max_s": 0.2, "max_retries": 3, "timeout_s": 1.0}


@pytest.fixture
def server():
    with FakeOpenAI(api_key=KEY) as fake:
        yield fake


def chat(server, **kwargs):
    return OpenAIChat(base_url=server.url, model="m", api_key=KEY, keep_columns=["id"], **{**FAST, **kwargs})


def batch(prompts):
    return {"id": np.arange(len(prompts)), "prompt": np.array(prompts, dtype=object)}


def test_answers_with_usage_finish_reason_and_kept_columns(server):
    out = chat(server, max_tokens=3)(batch(["hello there", "a b c d e", None]))
    assert out.column_names == ["id", "text", "finish_reason", "tokens_in", "tokens_out"]
    assert out.to_pylist() == [
        {"id": 0, "text": "echo: hello there", "finish_reason": "stop", "tokens_in": 2, "tokens_out": 3},
        {"id": 1, "text": "echo: a b", "finish_reason": "length", "tokens_in": 5, "tokens_out": 3},
        {"id": 2, "text": None, "finish_reason": None, "tokens_in": None, "tokens_out": None},  # null prompt: no request
    ]
    assert server.authorization_seen == {f"Bearer {KEY}"}


def test_every_batch_format_and_messages_with_a_system_prompt(server):
    predictor = OpenAIChat(base_url=server.url, model="m", api_key=KEY, messages_column="messages", system_prompt="be brief", **FAST)
    messages = [json.dumps([{"role": "user", "content": "hi"}]), [{"role": "user", "content": "yo you"}]]
    out = predictor({"messages": np.array(messages, dtype=object)})
    assert out.column("text").to_pylist() == ["echo: hi", "echo: yo you"]
    assert out.column("tokens_in").to_pylist() == [3, 4]  # the system prompt's words too
    table = pa.table({"id": [1, 2], "prompt": ["x", "y"]})
    assert chat(server)(table).column("text").to_pylist() == ["echo: x", "echo: y"]
    assert chat(server)(table.to_pandas()).column("id").to_pylist() == [1, 2]


def test_429_retry_after_is_honoured(server):
    server.retry_after = "1"
    started = time.monotonic()
    out = chat(server)(batch(["RATE2 p", "q"]))
    assert out.column("text").to_pylist() == ["echo: RATE2 p", "echo: q"]
    times = server.times["RATE2 p"]
    assert len(times) == 3 and times[1] - times[0] >= 1.0 and times[2] - times[1] >= 1.0  # not the 0.05 s backoff
    assert time.monotonic() - started < 4


def test_500s_timeouts_and_dropped_connections_are_retried(server):
    server.slow_s = 2.5  # past the 1 s timeout
    predictor = chat(server)
    out = predictor(batch(["E500x2 a", "SLOW1 b", "DROP2 c", "d"]))
    assert out.column("text").to_pylist() == ["echo: E500x2 a", "echo: SLOW1 b", "echo: DROP2 c", "echo: d"]
    assert (server.tries["E500x2 a"], server.tries["SLOW1 b"], server.tries["DROP2 c"], server.tries["d"]) == (3, 2, 3, 1)
    assert predictor.endpoint.counts["retries"] == 5


def test_a_400_and_exhausted_retries_fail_only_their_rows(server):
    with pytest.raises(RowsFailed) as caught:
        chat(server)(batch(["a", "BAD b", "ALWAYS500 c", "d"]))
    failed = caught.value
    assert sorted(failed.errors) == [1, 2]
    assert "HTTP 400: prompt rejected: BAD b" in failed.errors[1]
    assert "HTTP 500: internal error; gave up after 4 tries (max_retries=3)" in failed.errors[2]
    assert failed.output.to_pylist() == [
        {"id": 0, "text": "echo: a", "finish_reason": "stop", "tokens_in": 1, "tokens_out": 2},
        {"id": 3, "text": "echo: d", "finish_reason": "stop", "tokens_in": 1, "tokens_out": 2},
    ]
    assert server.tries["BAD b"] == 1 and server.tries["a"] == 1  # a 400 is not retried


def test_a_refused_key_or_nothing_listening_fails_the_batch_and_never_shows_the_key(server):
    wrong = "sk-wrong-key-fedcba9876543210"
    with pytest.raises(PredictorUnavailableError, match="refused the API key \\(HTTP 401: Incorrect API key provided\\)") as caught:
        OpenAIChat(base_url=server.url, model="m", api_key=wrong, **FAST)(batch(["a"]))
    assert wrong not in str(caught.value)
    dead = OpenAIChat(base_url="http://127.0.0.1:9/v1", model="m", api_key=wrong, **FAST)
    with pytest.raises(PredictorUnavailableError, match="cannot connect to http://127.0.0.1:9/v1/chat/completions .* after 4 tries") as caught:
        dead(batch(["a", "b"]))
    assert wrong not in str(caught.value)


def test_a_server_error_quoting_the_key_reaches_no_message(server):
    with pytest.raises(RowsFailed) as caught:
        chat(server)(batch(["ECHOKEY a", "b"]))
    assert "Authorization: Bearer ***" in caught.value.errors[0] and KEY not in str(caught.value.errors)


def test_every_row_of_a_batch_failing_for_good_is_the_endpoint_not_the_rows(server):
    with pytest.raises(PredictorUnavailableError, match="every one of the batch's 2 requests failed"):
        chat(server, max_retries=1)(batch(["ALWAYS500 a", "ALWAYS500 b"]))


def test_concurrency_is_bounded_and_used(server):
    server.latency_s = 0.2
    started = time.monotonic()
    chat(server, max_concurrency=8)(batch([f"p{i}" for i in range(32)]))
    elapsed = time.monotonic() - started
    assert 0.75 < elapsed < 2.0, elapsed  # 32 rows / 8 in flight * 0.2 s = 0.8 s (sequential: 6.4 s)


def test_httpx_request_log_is_quiet(server, caplog):
    with caplog.at_level(logging.INFO):
        chat(server)(batch(["a"]))
    assert not [r for r in caplog.records if r.name == "httpx" and r.levelno < logging.WARNING]


def test_embeddings_with_a_refused_text_sent_alone(server):
    predictor = OpenAIEmbeddings(base_url=server.url, model="e", api_key=KEY, keep_columns=["id"], inputs_per_request=2, **FAST)
    ok = predictor({"id": np.arange(3), "text": np.array(["one", "two words", None], dtype=object)})
    assert ok.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert ok.column("embedding").to_pylist() == [[3.0, 0.0, 1.0, 0.5], [9.0, 1.0, 1.0, 0.5], None]
    with pytest.raises(RowsFailed) as caught:
        predictor({"id": np.arange(3), "text": np.array(["a", "BAD b", "c"], dtype=object)})
    assert list(caught.value.errors) == [1] and "input too long" in caught.value.errors[1]
    assert caught.value.output.column("id").to_pylist() == [0, 2]


# -- through the runner (in-process), both policies ---------------------------------------------------------------

def _prompts_source(tmp_path) -> str:
    records = [{"id": i, "prompt": ("BAD " if i == 13 else "RATE1 " if i == 40 else "") + f"prompt {i}"} for i in range(60)]
    return write_jsonl(str(tmp_path / "in" / "p.jsonl"), records)


def _spec(tmp_path, server, **fields):
    return make_spec(
        _prompts_source(tmp_path), str(tmp_path / "out"), predictor="airflow_batch_provider.predictors.openai_compatible:OpenAIChat",
        predictor_kwargs={"base_url": server.url, "model": "m", "keep_columns": ["id"], **FAST},
        predictor_secrets={"api_key": "var:hosted_key"}, batch_size=16, **fields,
    )


def test_runner_skip_rejects_the_400_row_and_sends_every_other_row_once(tmp_path, server):
    spec = _spec(tmp_path, server, bad_rows="skip")
    runner = ShardRunner(spec, secrets={"api_key": KEY})
    for shard in plan_job(spec).pending:
        runner.run(shard, new_attempt())
    manifest = finalize_job(spec)
    assert manifest["rows_out"] == 59 and manifest["rows_rejected"] == 1
    folder = os.path.join(spec.sink_root, "_rejected")
    records = [json.loads(line) for n in os.listdir(folder) if n.endswith(".jsonl") for line in open(os.path.join(folder, n))]
    assert len(records) == 1 and records[0]["line"] == 14 and records[0]["row"] == {"id": 13, "prompt": "BAD prompt 13"}
    assert "HTTP 400: prompt rejected: BAD prompt 13" in records[0]["error"]
    assert server.tries["RATE1 prompt 40"] == 2
    assert all(count == 1 for prompt, count in server.tries.items() if "RATE" not in prompt)  # nothing re-sent
    assert KEY not in json.dumps(records) and KEY not in json.dumps(manifest)
    # The shard's counters (docs/counting.md), counted in the predictor's pool threads: every request
    # sent, the retry after the 429, and the tokens of every answer as its row has them.
    counters, table = manifest["counters"], sink_table(spec.sink_root)
    assert counters["requests"] == sum(server.tries.values()) == 61
    assert (counters["retries"], counters["throttled"]) == (1, 1) and counters["waited_s"] > 0
    assert counters["tokens_in"] == sum(table.column("tokens_in").to_pylist())
    assert counters["tokens_out"] == sum(table.column("tokens_out").to_pylist()) > 0


def test_runner_fail_names_the_row(tmp_path, server):
    spec = _spec(tmp_path, server)
    with pytest.raises(PredictorFailedError, match=r"p\.jsonl line 14: .*HTTP 400: prompt rejected: BAD prompt 13") as caught:
        ShardRunner(spec, secrets={"api_key": KEY}).run(plan_job(spec).pending[0], new_attempt())
    assert KEY not in str(caught.value)


def test_runner_skip_with_a_whole_batch_refused_keeps_the_other_batches(tmp_path, server):
    records = [{"id": i, "prompt": ("BAD " if i < 16 else "") + f"prompt {i}"} for i in range(40)]
    source = write_jsonl(str(tmp_path / "in" / "p.jsonl"), records)
    spec = make_spec(
        source, str(tmp_path / "out"), predictor="airflow_batch_provider.predictors.openai_compatible:OpenAIChat",
        predictor_kwargs={"base_url": server.url, "model": "m", "keep_columns": ["id"], **FAST},
        predictor_secrets={"api_key": "var:hosted_key"}, batch_size=16, bad_rows="skip",
    )
    ShardRunner(spec, secrets={"api_key": KEY}).run(plan_job(spec).pending[0], new_attempt())
    manifest = finalize_job(spec)
    assert manifest["rows_out"] == 24 and manifest["rows_rejected"] == 16
