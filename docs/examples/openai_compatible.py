"""A model behind an OpenAI-compatible endpoint: ``predictors.openai_compatible:OpenAIChat`` and
``OpenAIEmbeddings``, with the API key as a secret and a row the server refuses.

Run it from the repository root: ``python docs/examples/openai_compatible.py [work_dir]``
(needs the ``hosted`` extra: httpx). In production ``base_url`` is vLLM's or SGLang's OpenAI
server, TGI, OpenAI or a gateway; here a stand-in server on loopback (``serve()``, below)
answers ``echo: <prompt>`` with token usage, refuses a prompt containing ``BAD`` with HTTP
400 and any request without the key with 401. The jobs run on a local Ray (plan, the shards on
a model replica, finalize: what ``batch_inference(spec)``'s three tasks do in a DAG). See
docs/predictors.md#openaichat-and-openaiembeddings and docs/hosted-endpoints.md.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.dataset as ds

from airflow_batch_provider import BatchSpec
from airflow_batch_provider.core import api

API_KEY = "sk-example-0123456789"  # in a DAG: the password of an Airflow connection, never in the spec


def run_job(spec: BatchSpec, secrets: dict[str, str] | None = None) -> dict:
    """What the DAG's plan, shard and finalize tasks do, in this process, on a local Ray.
    ``secrets``: the values of ``spec.predictor_secrets``, which a DAG's tasks resolve from
    the connections or Variables the spec names; they reach the replica through Ray's object
    store, never through the spec."""
    core = spec.core()
    api.connect()  # no address: starts a local Ray (a DAG's tasks use the `ray` connection's cluster)
    pool = api.ReplicaPool(core, secrets=secrets)  # the replicas: each builds the predictor once
    try:
        pending = api.plan(core).pending  # the shards not committed yet
        for result in pool.result(pool.submit(pending, api.new_attempt())) if pending else []:
            print(f"shard {result['shard_id']}: {result['status']}, {result['rows_in']} rows in, "
                  f"{result['rows_out']} out, {result['rows_rejected']} rejected")
    finally:
        pool.shutdown(force=True)  # in a DAG, finalize releases them (or they exit when idle)
    return api.finalize(core)  # checks every shard is committed, writes _SUCCESS


def serve() -> str:
    """A stand-in OpenAI-compatible server on loopback; returns its API root."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                return self.answer(401, {"error": {"message": "Incorrect API key provided"}})
            if self.path == "/v1/embeddings":
                data = [{"index": i, "embedding": [float(len(t)), float(t.count(" ")), 1.0]} for i, t in enumerate(body["input"])]
                return self.answer(200, {"data": data, "usage": {"prompt_tokens": sum(len(t.split()) for t in body["input"])}})
            prompt = body["messages"][-1]["content"]
            if "BAD" in prompt:
                return self.answer(400, {"error": {"message": f"prompt rejected: {prompt}"}})
            words = prompt.split()
            return self.answer(200, {"choices": [{"message": {"role": "assistant", "content": "echo: " + prompt}, "finish_reason": "stop"}],
                                     "usage": {"prompt_tokens": len(words), "completion_tokens": len(words) + 1}})

        def answer(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="abp-example-hosted-")
    base_url = serve()
    source = os.path.join(work, "questions.jsonl")
    prompts = ["what is ray", "BAD prompt", None, "how do shards commit"]
    with open(source, "w") as handle:
        for i in range(20):
            handle.write(json.dumps({"id": i, "prompt": prompts[i % 4]}) + "\n")

    chat = BatchSpec(
        source=source,
        sink=os.path.join(work, "answers"),
        predictor="airflow_batch_provider.predictors.openai_compatible:OpenAIChat",
        predictor_kwargs={"base_url": base_url, "model": "my-llm", "prompt_column": "prompt", "keep_columns": ["id"],
                          "max_tokens": 64, "max_concurrency": 4},
        predictor_secrets={"api_key": "conn:llm_gateway"},  # a reference: the DAG's tasks resolve it
        bad_rows="skip",  # the refused row goes to _rejected/, the others are written
        max_bad_rows=0.5,
        batch_size=8,
        rows_per_shard=10,
        num_cpus=0.5,  # no GPU: the model runs behind the endpoint
        num_replicas=1,
    )
    manifest = run_job(chat, secrets={"api_key": API_KEY})
    table = ds.dataset(chat.sink, format="parquet").to_table().sort_by("id")
    print(f"{manifest['rows_out']} rows in {chat.sink}, {manifest['rows_rejected']} in {chat.sink}/_rejected/")
    for row in table.slice(0, 3).to_pylist():
        print(row)
    assert table.column_names == ["id", "text", "finish_reason", "tokens_in", "tokens_out"]
    assert table.column("id").to_pylist() == [i for i in range(20) if i % 4 != 1]  # the 400s are not in the sink
    assert table.slice(0, 1).to_pylist() == [{"id": 0, "text": "echo: what is ray", "finish_reason": "stop", "tokens_in": 3, "tokens_out": 4}]
    by_id = {row["id"]: row for row in table.to_pylist()}
    assert by_id[2] == {"id": 2, "text": None, "finish_reason": None, "tokens_in": None, "tokens_out": None}  # null prompt: no request
    rejected = [json.loads(line) for name in sorted(glob.glob(os.path.join(chat.sink, "_rejected", "*.jsonl")))
                for line in open(name)]
    print("rejected:", {k: rejected[0][k] for k in ("file", "line", "error")})
    assert sorted(r["line"] for r in rejected) == [i + 1 for i in range(20) if i % 4 == 1]  # 1-based JSONL lines
    assert all("HTTP 400: prompt rejected: BAD prompt" in r["error"] for r in rejected)
    assert manifest["rows_rejected"] == 5
    for path, _, files in os.walk(work):  # the key is in no file the jobs wrote
        for name in files:
            with open(os.path.join(path, name), "rb") as handle:
                assert API_KEY.encode() not in handle.read(), os.path.join(path, name)

    embed = BatchSpec(
        source=source,
        sink=os.path.join(work, "prompt_vectors"),
        predictor="airflow_batch_provider.predictors.openai_compatible:OpenAIEmbeddings",
        predictor_kwargs={"base_url": base_url, "model": "my-embedder", "text_column": "prompt", "keep_columns": ["id"],
                          "inputs_per_request": 4},
        predictor_secrets={"api_key": "conn:llm_gateway"},
        batch_size=8, rows_per_shard=10, num_cpus=0.5, num_replicas=1,
    )
    manifest = run_job(embed, secrets={"api_key": API_KEY})
    table = ds.dataset(embed.sink, format="parquet").to_table().sort_by("id")
    print(f"{manifest['rows_out']} rows in {embed.sink}; embedding: {table.schema.field('embedding').type}")
    assert table.schema.field("embedding").type.list_size == 3
    assert table.column("embedding").to_pylist()[:3] == [[11.0, 2.0, 1.0], [10.0, 1.0, 1.0], None]
    print("example ok")


if __name__ == "__main__":
    sys.exit(main())
