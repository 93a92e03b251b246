"""The hosted-endpoint predictor (OpenAIChat) against the loopback OpenAI-compatible server.

1. Throughput: rows/s through the provider (ShardRunner, JSONL in, Parquet out) for a given
   server latency and max_concurrency, beside the ceiling concurrency / latency and a bare
   httpx thread-pool loop over the same server (what the provider costs on top).
2. A burst of 429s: every request during the first ``--burst`` seconds gets 429 with
   ``Retry-After: 1``; the extra seconds the same job takes over the run without one.

    python benchmarks/hosted.py [--rows 1200] [--latency 0.05] [--concurrency 1 8 32] [--burst 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402

from airflow_batch_provider.core.domain.commit import new_attempt  # noqa: E402
from airflow_batch_provider.core.domain.jobs import plan_job  # noqa: E402
from airflow_batch_provider.core.execution.runner import ShardRunner  # noqa: E402
from airflow_batch_provider.core.spec import JobSpec  # noqa: E402
from tests.helpers import write_jsonl  # noqa: E402
from tests.openai_server import FakeOpenAI  # noqa: E402

KEY = "sk-bench"


def provider_run(server: FakeOpenAI, rows: int, concurrency: int, folder: str, batch_size: int | None = None) -> tuple[float, int]:
    """Seconds to run the job through the provider, and the requests the server saw."""
    source = write_jsonl(os.path.join(folder, "in", "p.jsonl"), [{"id": i, "prompt": f"prompt number {i}"} for i in range(rows)])
    spec = JobSpec(
        source=source, sink=os.path.join(folder, "out"), source_format="jsonl",
        predictor="airflow_batch_provider.predictors.openai_compatible:OpenAIChat",
        predictor_kwargs={"base_url": server.url, "model": "m", "keep_columns": ["id"], "max_concurrency": concurrency},
        predictor_secrets={"api_key": "var:k"}, batch_size=batch_size or max(64, 4 * concurrency), rows_per_shard=rows,
    )
    before = sum(server.tries.values())
    runner = ShardRunner(spec, secrets={"api_key": KEY})
    started = time.perf_counter()
    for shard in plan_job(spec).pending:
        runner.run(shard, new_attempt())
    return time.perf_counter() - started, sum(server.tries.values()) - before


def bare_run(server: FakeOpenAI, rows: int, concurrency: int) -> float:
    """The same requests from a bare httpx thread pool: no reading, writing or retries."""
    client = httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, limits=httpx.Limits(max_connections=concurrency))

    def one(i: int) -> str:
        body = {"model": "m", "messages": [{"role": "user", "content": f"prompt number {i}"}]}
        return client.post(f"{server.url}/chat/completions", json=body).json()["choices"][0]["message"]["content"]

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(rows)))
    client.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--burst", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=None, help="default: max(64, 4 x concurrency)")
    args = parser.parse_args()
    results = []
    with FakeOpenAI(api_key=KEY, latency_s=args.latency, retry_after="1") as server:
        for concurrency in args.concurrency:
            rows = args.rows if concurrency > 1 else max(40, args.rows // 20)
            with tempfile.TemporaryDirectory() as folder:
                seconds, _ = provider_run(server, rows, concurrency, folder, args.batch_size)
            bare = bare_run(server, rows, concurrency)
            row = {"concurrency": concurrency, "latency_s": args.latency, "rows": rows, "batch_size": args.batch_size,
                   "provider_rows_s": round(rows / seconds, 1), "bare_rows_s": round(rows / bare, 1),
                   "ceiling_rows_s": round(concurrency / args.latency, 1), "provider_vs_bare": round(bare / seconds, 3)}
            results.append(row)
            print(json.dumps(row), flush=True)
        concurrency = max(args.concurrency)
        with tempfile.TemporaryDirectory() as folder:
            calm, _ = provider_run(server, args.rows, concurrency, folder)
        with tempfile.TemporaryDirectory() as folder:
            server.throttle_until = time.monotonic() + args.burst
            before = server.statuses[429]
            throttled, requests = provider_run(server, args.rows, concurrency, folder)
            refused = server.statuses[429] - before
        burst = {"burst_s": args.burst, "retry_after_s": 1, "concurrency": concurrency, "rows": args.rows,
                 "calm_s": round(calm, 2), "with_burst_s": round(throttled, 2), "burst_cost_s": round(throttled - calm, 2),
                 "requests": requests, "answered_429": refused}
        print(json.dumps(burst), flush=True)


if __name__ == "__main__":
    main()
