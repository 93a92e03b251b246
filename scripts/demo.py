"""`make demo`: embed a generated corpus with the example DAG, twice, under `airflow dags test`.

Embedded defaults: SQLite Airflow DB and everything else under ./.demo, a local Ray started
by the DAG run, local files, and the real all-MiniLM-L6-v2 model (bundled, offline).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, ".demo")
ROWS = int(os.environ.get("DEMO_ROWS", "4000"))
sys.path.insert(0, ROOT)

from airflow_batch_provider.core.api import Progress  # noqa: E402
from airflow_batch_provider.core.events import EventKind, parse_events  # noqa: E402
from scripts.make_corpus import write_corpus  # noqa: E402


def airflow_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=os.path.join(DEMO, "airflow"),
        AIRFLOW__CORE__DAGS_FOLDER=os.path.join(ROOT, "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
        BATCH_DEMO_DIR=DEMO,
        BATCH_DEMO_PROGRESS_S=os.environ.get("BATCH_DEMO_PROGRESS_S", "3"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def run_dag(env: dict[str, str], log_name: str) -> tuple[float, str]:
    """``airflow dags test``, its log kept in .demo; the shard tasks' progress lines shown live."""
    log_path = os.path.join(DEMO, log_name)
    started = time.perf_counter()
    done = 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "airflow"), "dags", "test", "batch_inference_example"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            for event in parse_events(line):
                if event["event"] == EventKind.PROGRESS:
                    progress = Progress(event["rows_done"], event["rows_total"], event["seconds"])
                    print(f"  {time.perf_counter() - started:6.1f} s  {event['label']}: {progress.describe()}", flush=True)
                elif event["event"] == EventKind.SHARD_DONE and event["status"] in ("computed", "skipped"):
                    done += event["rows_in"]
                    print(f"  {time.perf_counter() - started:6.1f} s  shard {event['status']}; {done:,} of {ROWS:,} rows done", flush=True)
        code = proc.wait()
    elapsed = time.perf_counter() - started
    text = open(log_path).read()
    if code != 0 or "state=success" not in text:
        print(text[-4000:])
        sys.exit(f"the DAG run failed (exit {code}); full log: {log_path}")
    return elapsed, text


def main() -> None:
    env = airflow_env()
    os.makedirs(DEMO, exist_ok=True)
    corpus = os.path.join(DEMO, "corpus")
    if not os.path.isdir(corpus):
        write_corpus(corpus, ROWS, files=4)
        print(f"generated {ROWS} rows of text in {corpus}")
    sink = os.path.join(DEMO, "embeddings")
    shutil.rmtree(sink, ignore_errors=True)
    airflow = os.path.join(os.path.dirname(sys.executable), "airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)

    print("run 1: airflow dags test batch_inference_example ...", flush=True)
    wall, _ = run_dag(env, "run1.log")
    manifest = json.load(open(os.path.join(sink, "_SUCCESS")))
    job_seconds = manifest.get("elapsed_seconds") or wall
    print(
        f"  shards: {manifest['shards']}  rows in: {manifest['rows_in']}  rows out: {manifest['rows_out']}  "
        f"bytes: {manifest['bytes']}\n"
        f"  job time (plan -> finalize): {job_seconds:.1f} s  -> {manifest['rows_in'] / job_seconds:.1f} rows/s "
        f"(all-MiniLM-L6-v2, model load included; whole command {wall:.1f} s)"
    )

    print("run 2: the same DAG again (resume: committed shards are not mapped) ...", flush=True)
    wall2, log2 = run_dag(env, "run2.log")
    plans = parse_events(log2, EventKind.PLAN)
    if not plans:
        sys.exit("could not find the plan event in the second run's log")
    shards, committed, pending = plans[0]["shards"], plans[0]["committed"], plans[0]["pending"]
    print(f"  {committed} of {shards} shards skipped (already committed), {pending} computed; whole command {wall2:.1f} s")
    import pyarrow.dataset as ds

    table = ds.dataset(sink, format="parquet").to_table(columns=["id"])
    ids = table.column("id").to_pylist()
    print(f"  sink holds {len(ids)} rows, {len(set(ids))} distinct ids, embedding dim "
          f"{ds.dataset(sink, format='parquet').schema.field('embedding').type.list_size}")
    if pending != 0 or len(ids) != ROWS or len(set(ids)) != ROWS:
        sys.exit("unexpected: the rerun computed shards again or the sink is not exactly the input")
    print(f"demo ok: output in {sink}, logs in {DEMO}/run1.log and run2.log")


if __name__ == "__main__":
    main()
