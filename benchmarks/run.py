"""`make bench`: the provider against a bare model loop and Ray Data, on the same corpus and model.

One invocation:
1. generates a JSONL corpus (BENCH_ROWS, default 8,000) and starts a Ray head (`ray start
   --head`, its own temp dir, token auth as Ray 2.60 sets it up) with one logical CPU more
   than the model gets, so Ray Data's read/write tasks can run beside its 2-CPU actor;
2. runs all-MiniLM-L6-v2 over it four ways, each from a cold process, model load counted:
   - a bare loop (read JSONL with pyarrow, `SentenceEmbedder` batch by batch, write Parquet),
   - Ray Data: read_json -> map_batches(SentenceEmbedder, one actor) -> write_parquet,
   - the provider's core without Airflow (plan, each shard on the Ray replica, finalize),
   - this provider end to end: `airflow dags test batch_inference_example` on that Ray;
   all but Ray Data run BENCH_REPEATS times each (default 2), interleaved (see ``schedule``)
   so that the machine's drift in speed cancels;
3. measures per-shard overhead, replica peak RSS at two shard sizes 10x apart, the cost
   of a resume after half the shards were committed, and plan time over 10,000 committed
   shards; prints a table with ratios against the bare loop.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from airflow_batch_provider.core.events import EventKind, parse_events  # noqa: E402

WORK = os.environ.get("BENCH_DIR", os.path.join(ROOT, ".bench"))
ROWS = int(os.environ.get("BENCH_ROWS", "8000"))
BATCH = int(os.environ.get("BENCH_BATCH_SIZE", "64"))
ROWS_PER_SHARD = int(os.environ.get("BENCH_ROWS_PER_SHARD", "1000"))
CPUS = int(os.environ.get("BENCH_CPUS", str(min(2, os.cpu_count() or 1))))
PLAN_SHARDS = int(os.environ.get("BENCH_PLAN_SHARDS", "10000"))
REPEATS = max(1, int(os.environ.get("BENCH_REPEATS", "2")))  # timed runs of the bare loop and of the provider
BIN = os.path.dirname(sys.executable)
PREDICTOR = "airflow_batch_provider.predictors.sentence_embedding:SentenceEmbedder"
KWARGS = {"text_column": "text", "keep_columns": ["id"]}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# -- Ray head ----------------------------------------------------------------------------------
class RayHead:
    def __init__(self, temp_dir: str):
        self.temp_dir = temp_dir
        self.env: dict[str, str] = {}

    def start(self) -> dict[str, str]:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.makedirs(self.temp_dir, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        out = subprocess.run(
            [f"{BIN}/ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
             f"--num-cpus={CPUS + 1}", f"--temp-dir={self.temp_dir}", "--include-dashboard=false", "--disable-usage-stats"],
            env=env, capture_output=True, text=True,
        )
        if out.returncode != 0:
            sys.exit(f"ray start failed:\n{out.stdout}\n{out.stderr}")
        found = re.search(r"ray start --address='([^']+)'", out.stdout + out.stderr)
        self.address = found.group(1) if found else f"127.0.0.1:{port}"
        self.env = {"RAY_ADDRESS": self.address}
        token = _find_token(out.stdout + out.stderr)
        if token:
            self.env.update(RAY_AUTH_TOKEN=token, RAY_AUTH_MODE="token")
        os.environ.update(self.env)
        return self.env

    def processes(self) -> dict[int, "psutil.Process"]:  # noqa: F821
        """This head's processes (GCS, raylet, agents, workers) and their children."""
        import psutil

        mine = [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()
                if any(self.temp_dir in arg or f"--address={self.address}" == arg for arg in p.info["cmdline"] or [])]
        found = {p.pid: p for p in mine}
        for proc in mine:
            for child in proc.children(recursive=True):
                found[child.pid] = child
        return found

    def system_cpu_seconds(self) -> dict[int, float]:
        """CPU seconds so far of each of this head's processes that is not a model replica."""
        import psutil

        seconds = {}
        for pid, proc in self.processes().items():
            try:
                if "ray::Replica" in " ".join(proc.cmdline()) + proc.name():
                    continue
                times = proc.cpu_times()
                seconds[pid] = times.user + times.system
            except psutil.Error:
                continue
        return seconds

    def stop(self) -> None:
        """Stop this head only (``ray stop`` would stop every Ray on the machine)."""
        import psutil

        victims = self.processes()
        for proc in victims.values():
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(victims.values()), timeout=10)


def _find_token(text: str) -> str | None:
    token_file = os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    if os.path.exists(token_file):
        return open(token_file).read().strip()
    match = re.search(r"RAY_AUTH_TOKEN=(\S+)", text)
    return match.group(1) if match else None


# -- the ways ------------------------------------------------------------------------------
def bare_loop(corpus: str, out: str) -> dict[str, float]:
    """Seconds for the whole loop, for loading the model (imports included), and in the model."""
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    from airflow_batch_provider.core.execution.batches import from_batch, to_batch
    from airflow_batch_provider.predictors.sentence_embedding import SentenceEmbedder

    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    model = SentenceEmbedder(**KWARGS)
    load = time.perf_counter() - started
    writer = None
    model_seconds = 0.0
    for path in sorted(glob.glob(f"{corpus}/*.jsonl")):
        table = pj.read_json(path)
        for offset in range(0, table.num_rows, BATCH):
            tick = time.perf_counter()
            output = model(to_batch(table.slice(offset, BATCH), "numpy"))
            model_seconds += time.perf_counter() - tick
            result = from_batch(output, "numpy")
            if writer is None:
                writer = pq.ParquetWriter(f"{out}/bare.parquet", result.schema)
            writer.write_table(result)
    writer.close()
    seconds = time.perf_counter() - started
    assert pq.read_metadata(f"{out}/bare.parquet").num_rows == ROWS
    del pa
    return {"seconds": seconds, "load_seconds": load, "model_seconds": model_seconds}


def ray_data(corpus: str, out: str) -> float:
    import ray

    from airflow_batch_provider.predictors.sentence_embedding import SentenceEmbedder

    ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
    started = time.perf_counter()
    (
        ray.data.read_json(sorted(glob.glob(f"{corpus}/*.jsonl")))
        .map_batches(SentenceEmbedder, fn_constructor_kwargs=KWARGS, batch_size=BATCH, concurrency=1,
                     num_cpus=CPUS, batch_format="numpy")
        .write_parquet(out)
    )
    seconds = time.perf_counter() - started
    ray.shutdown()
    import pyarrow.dataset as ds

    assert ds.dataset(out, format="parquet").count_rows() == ROWS
    return seconds


def core_driver(corpus: str, sink: str) -> dict[str, float]:
    """The provider's core without Airflow: plan, each shard on the Ray replica in turn, finalize.

    Same spec, replica and commit protocol as the DAG's tasks, driven by one Python process; the
    difference to the Airflow run is what Airflow adds (task start-up, state, XCom, logs).
    """
    import ray

    from airflow_batch_provider.core import api

    api.connect()
    spec = bench_spec(corpus, sink).core()
    started = time.perf_counter()
    job = api.plan(spec)
    pool = api.ReplicaPool(spec)
    pool.start(1)
    model = 0.0
    for shard in job.pending:
        work = pool.submit([shard], api.new_attempt())
        model += sum(r["model_seconds"] for r in pool.result(work))
    manifest = api.finalize(spec)
    seconds = time.perf_counter() - started
    pool.shutdown()
    ray.shutdown()
    assert manifest["rows_out"] == ROWS
    return {"seconds": seconds, "model_seconds": model}


def bench_spec(corpus: str, sink: str, rows_per_shard: int = ROWS_PER_SHARD):
    """The spec the example DAG runs with the bench's settings (see ``provider_env``)."""
    from airflow_batch_provider import BatchSpec

    return BatchSpec(source=f"{corpus}/*.jsonl", sink=sink, predictor=PREDICTOR, predictor_kwargs=KWARGS,
                     batch_size=BATCH, rows_per_shard=rows_per_shard, num_cpus=CPUS)


def provider_env(corpus: str, sink: str, rows_per_shard: int = ROWS_PER_SHARD) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW_HOME": f"{WORK}/airflow",
        "AIRFLOW__CORE__DAGS_FOLDER": f"{ROOT}/dags",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "BATCH_DEMO_SOURCE": f"{corpus}/*.jsonl",
        "BATCH_DEMO_SINK": sink,
        "BATCH_DEMO_BATCH_SIZE": str(BATCH),
        "BATCH_DEMO_ROWS_PER_SHARD": str(rows_per_shard),
        "BATCH_DEMO_NUM_CPUS": str(CPUS),
        "BATCH_DEMO_NUM_GPUS": os.environ.get("BATCH_DEMO_NUM_GPUS", "0"),
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def _children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def dags_test(env: dict[str, str], log_name: str) -> tuple[float, str]:
    """``airflow dags test`` of the example DAG: seconds and its output (kept in WORK/log_name)."""
    started = time.perf_counter()
    out = subprocess.run([f"{BIN}/airflow", "dags", "test", "batch_inference_example"], env=env,
                         capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    text = out.stdout + out.stderr
    open(f"{WORK}/{log_name}", "w").write(text)
    if "state=success" not in text:
        sys.exit(f"the DAG run failed; see {WORK}/{log_name}")
    return wall, text


def provider(
    corpus: str, sink: str, head: RayHead | None = None, log_name: str = "provider.log"
) -> tuple[float, float, str, dict[str, float]]:
    """Seconds plan->finalize, seconds of the whole command, its log, and CPU used beside the model."""
    env = provider_env(corpus, sink)
    subprocess.run([f"{BIN}/airflow", "db", "migrate"], env=env, check=True, capture_output=True)
    ray_before = head.system_cpu_seconds() if head else {}
    airflow_before = _children_cpu_seconds()
    wall, text = dags_test(env, log_name)
    ray_after = head.system_cpu_seconds() if head else {}
    cpu = {
        "airflow": _children_cpu_seconds() - airflow_before,
        "ray": sum(ray_after[pid] - ray_before.get(pid, 0.0) for pid in ray_after),
    }
    manifest = json.load(open(f"{sink}/_SUCCESS"))
    assert manifest["rows_out"] == ROWS
    return manifest["elapsed_seconds"], wall, text, cpu


def replica_load_seconds(log_text: str) -> float:
    """Seconds the replicas spent loading the model (the first shard of each reports it)."""
    return sum(e["model_load_seconds"] for e in parse_events(log_text, EventKind.SHARD_DONE))


def shard_model_seconds(log_text: str) -> float:
    """Seconds in the predictor's calls over the shards the run computed."""
    return sum(e["model_seconds"] for e in parse_events(log_text, EventKind.SHARD_DONE) if e["status"] == "computed")


def shard_overheads(log_text: str) -> list[float]:
    """Each shard task's wall time not spent in the model."""
    return [e["overhead_seconds"] for e in parse_events(log_text, EventKind.SHARD_TASK)]


# -- memory, resume, plan ------------------------------------------------------------------------
def replica_peak_rss(corpus: str, rows_per_shard: int) -> tuple[float, int]:
    """Peak RSS (MiB) of a fresh model replica after running one shard of ``rows_per_shard``."""
    from airflow_batch_provider.core import api

    sink = f"{WORK}/rss-{rows_per_shard}"
    shutil.rmtree(sink, ignore_errors=True)
    spec = bench_spec(corpus, sink, rows_per_shard).core()
    api.connect()
    pool = api.ReplicaPool(spec)
    pool.shutdown()
    shard = api.plan(spec).pending[0]
    result = pool.result(pool.submit([shard], api.new_attempt()))[0]
    status = open(f"/proc/{result['worker_pid']}/status").read()
    peak_kib = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    pool.shutdown()
    return peak_kib / 1024, result["rows_in"]


def resume_cost(corpus: str, sink: str) -> tuple[float, int, int]:
    """Uncommit half the shards, rerun the DAG: wall time, rows computed, committed rows recomputed."""
    from airflow_batch_provider import BatchSpec
    from airflow_batch_provider.core.domain.layout import JobStorage

    spec = BatchSpec(source=f"{corpus}/*.jsonl", sink=sink, predictor=PREDICTOR, predictor_kwargs=KWARGS,
                     rows_per_shard=ROWS_PER_SHARD)
    storage = JobStorage.for_spec(spec)
    shards = storage.read_plan().shards
    dropped = shards[::2]
    for shard in dropped:
        os.remove(storage.sentinel_path(shard.shard_id))
        os.remove(storage.part_path(shard.shard_id))
    kept_ids = set(storage.committed_ids())
    before = {s.shard_id: os.stat(storage.part_path(s.shard_id)).st_mtime_ns for s in shards if s.shard_id in kept_ids}
    wall, text = dags_test(provider_env(corpus, sink), "resume.log")
    computed = sum(e["rows_in"] for e in parse_events(text, EventKind.SHARD_DONE) if e["status"] == "computed")
    touched = [sid for sid, mtime in before.items() if os.stat(storage.part_path(sid)).st_mtime_ns != mtime]
    recomputed_committed = sum(s.rows for s in shards if s.shard_id in touched)
    return wall, computed, recomputed_committed


def plan_time_10k() -> tuple[float, int, float]:
    """Plan over a sink holding PLAN_SHARDS committed shards (one row each), on local disk."""
    from airflow_batch_provider import BatchSpec
    from airflow_batch_provider.core.domain.commit import new_attempt
    from airflow_batch_provider.core.domain.jobs import plan_job
    from airflow_batch_provider.core.execution.runner import ShardRunner

    src = f"{WORK}/plan10k/in"
    os.makedirs(src, exist_ok=True)
    with open(f"{src}/rows.jsonl", "w") as handle:
        handle.writelines(json.dumps({"id": i}) + "\n" for i in range(PLAN_SHARDS))
    spec = BatchSpec(source=src, source_format="jsonl", sink=f"{WORK}/plan10k/out",
                     predictor="benchmarks.identity:Identity", rows_per_shard=1)
    started = time.perf_counter()
    runner = ShardRunner(spec)
    for shard in plan_job(spec).pending:
        runner.run(shard, new_attempt())
    commit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    job = plan_job(spec)
    seconds = time.perf_counter() - started
    assert job.committed == PLAN_SHARDS and not job.pending
    return seconds, job.committed, commit_seconds / PLAN_SHARDS


def _disconnect() -> None:
    """Leave Ray before stopping the head: a connected driver exits the process when its GCS goes."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def schedule(repeats: int) -> list[str]:
    """The order of the timed runs: the bare loop, the core and the provider, mirrored around Ray Data.

    This machine's speed drifts by several percent over minutes (other tenants, clock), so
    runs taken in one order only would credit that drift to whichever way ran in the faster
    minutes. With ``repeats=2`` the order is bare, core, provider, Ray Data, provider, core,
    bare: a linear drift cancels in the mean of each way.
    """
    ways = ["bare", "core", "provider"]
    blocks = [ways if index % 2 == 0 else ways[::-1] for index in range(repeats)]
    half = (repeats + 1) // 2
    return [way for block in blocks[:half] for way in block] + ["ray_data"] + [way for block in blocks[half:] for way in block]


def in_fresh_process(function: str, *args: str) -> Any:
    """Call ``benchmarks.run.<function>(*args)`` in a new Python process and return its result.

    Every timed way starts cold, as a user's script would: imports and model load are paid
    each time, and nothing loaded by an earlier run (torch, the model, a Ray driver) helps.
    """
    code = (f"import json, sys; sys.path.insert(0, {ROOT!r}); from benchmarks import run; "
            f"print('RESULT', json.dumps(run.{function}(*{args!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    match = re.search(r"^RESULT (.*)$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or not match:
        sys.exit(f"{function} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(match.group(1))


def main() -> None:
    from scripts.make_corpus import write_corpus

    shutil.rmtree(WORK, ignore_errors=True)
    corpus = f"{WORK}/corpus"
    write_corpus(corpus, ROWS, files=4)
    order = schedule(REPEATS)
    log(f"corpus: {ROWS} rows in 4 JSONL files; batch {BATCH}; {CPUS} CPUs; rows_per_shard {ROWS_PER_SHARD}")
    log(f"run order: {', '.join(order)}")
    head = RayHead(f"/tmp/abp-bench-ray-{os.getpid()}")
    head.start()
    log(f"Ray head started at {head.address}")
    bare: list[dict[str, float]] = []
    core: list[dict[str, float]] = []
    prov, prov_wall, prov_model, overheads, prov_loads = [], [], [], [], []
    prov_cpu: dict[str, float] = {"ray": 0.0, "airflow": 0.0}
    try:
        for step, way in enumerate(order):
            if way == "bare":
                log("bare loop ...")
                bare.append(in_fresh_process("bare_loop", corpus, f"{WORK}/bare-{step}"))
                log(f"bare loop {bare[-1]['seconds']:.1f} s (model load {bare[-1]['load_seconds']:.1f} s)")
            elif way == "core":
                log("provider core without Airflow ...")
                core.append(in_fresh_process("core_driver", corpus, f"{WORK}/core-{step}"))
                log(f"provider core {core[-1]['seconds']:.1f} s")
            elif way == "ray_data":
                log("Ray Data ...")
                ray_data_s = in_fresh_process("ray_data", corpus, f"{WORK}/raydata")
                log(f"Ray Data {ray_data_s:.1f} s")
            else:
                log("provider (airflow dags test) ...")
                sink = f"{WORK}/provider" if not prov else f"{WORK}/provider-{step}"
                seconds, wall, text, cpu = provider(corpus, sink, head, log_name=f"provider-{len(prov) + 1}.log")
                prov.append(seconds)
                prov_wall.append(wall)
                prov_model.append(shard_model_seconds(text))
                overheads.extend(shard_overheads(text))
                prov_loads.append(replica_load_seconds(text))
                for key in prov_cpu:
                    prov_cpu[key] += cpu[key] / REPEATS
                log(f"provider {seconds:.1f} s (whole command {wall:.1f} s)")
        log("resume after half the shards committed ...")
        resume_wall, resume_rows, recomputed = resume_cost(corpus, f"{WORK}/provider")
        log("replica RSS at two shard sizes ...")
        small = max(1, ROWS_PER_SHARD // 5)
        rss_small, rows_small = replica_peak_rss(corpus, small)
        rss_large, rows_large = replica_peak_rss(corpus, small * 10)
    finally:
        _disconnect()
        head.stop()
    log(f"plan over {PLAN_SHARDS} committed shards ...")
    plan_s, plan_n, per_shard_commit = plan_time_10k()

    mean = statistics.mean
    bare_s = [b["seconds"] for b in bare]
    base = mean(bare_s)
    rate = lambda s: ROWS / s  # noqa: E731
    runs = lambda xs: " / ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    print()
    print(f"{'way (mean of the runs)':<46}{'seconds':>10}{'rows/s':>10}{'x bare':>9}   runs (s)")
    rows = (("bare loop (model load included)", bare_s), ("Ray Data read_json->map_batches->write", [ray_data_s]),
            ("provider core, no Airflow (plan->finalize)", [c["seconds"] for c in core]),
            ("provider, airflow dags test (plan->finalize)", prov), ("provider, whole dags-test command", prov_wall))
    for name, secs in rows:
        print(f"{name:<46}{mean(secs):>10.1f}{rate(mean(secs)):>10.1f}{base / mean(secs):>9.3f}   {runs(secs)}")
    if REPEATS > 1:
        pairs = [b / p for b, p in zip(bare_s, prov, strict=True)]
        print(f"provider / bare loop, run by run (plan->finalize): {', '.join(f'{x:.3f}x' for x in pairs)}")
    print()
    model = {"bare loop": [b["model_seconds"] for b in bare], "core": [c["model_seconds"] for c in core], "provider": prov_model}
    print("seconds in the predictor's calls (same rows, same batches): "
          + "; ".join(f"{name} {mean(xs):.1f} ({runs(xs)})" for name, xs in model.items()))
    print(f"seconds beside them: bare loop {base - mean(model['bare loop']):.1f} (model load and I/O), "
          f"core {mean(c['seconds'] for c in core) - mean(model['core']):.1f}, provider {mean(prov) - mean(prov_model):.1f}")
    print(f"model load: bare loop {mean(b['load_seconds'] for b in bare):.1f} s in process; provider {mean(prov_loads):.1f} s "
          "on the replica, started by the plan step")
    print(f"CPU used beside the model per provider run ({CPUS} cores): Ray's own processes "
          f"{prov_cpu['ray']:.1f} s, the airflow dags-test process {prov_cpu['airflow']:.1f} s (its start-up included)")
    median = statistics.median(overheads) if overheads else float("nan")
    print(f"per-shard overhead (task wall - model), median of {len(overheads)}: {median:.3f} s "
          f"(shard of {ROWS_PER_SHARD} rows ~ {ROWS_PER_SHARD / rate(mean(prov)):.1f} s)")
    print(f"replica peak RSS: {rss_small:.0f} MiB at {rows_small} rows/shard, {rss_large:.0f} MiB at "
          f"{rows_large} rows/shard -> {rss_large / rss_small:.3f}x")
    print(f"resume after half the shards committed: {resume_wall:.1f} s, {resume_rows} rows computed "
          f"({ROWS - resume_rows} skipped), committed rows computed again: {recomputed}")
    print(f"plan over {plan_n} committed shards (local disk): {plan_s:.2f} s "
          f"(committing them took {per_shard_commit * 1000:.1f} ms per 1-row shard)")


if __name__ == "__main__":
    main()
