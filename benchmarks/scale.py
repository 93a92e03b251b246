"""`make bench-scale`: what the provider's own machinery costs when the model is cheap.

An identity predictor (``benchmarks/identity.py``) over generated rows (an id and a short
text), so that everything measured is reading, shard handling, committing and writing:

1. ``io``: the I/O ceiling. SCALE_ROWS rows as JSONL and as Parquet, on local disk and on a
   SeaweedFS S3 server (SCALE_S3=0 leaves S3 out), through ``airflow dags test`` on a Ray head,
   against a single-process pyarrow read -> Parquet write of the same files (the limit of this
   machine for that work). Rows/s, input MB/s, ratio; locally with one shard per mapped task,
   with SCALE_IO_SHARDS_PER_TASK shards per task, and by the core alone (no Airflow, no Ray).
2. ``resume``: head to head with Ray Data's own checkpointing (``CheckpointConfig(id_column=
   "id")``) at each size of SCALE_RESUME_ROWS: each run is SIGKILLed (its whole process group)
   once about half of its output is written, then resumed. Rows computed again, wall time of
   the resumed run, peak RSS of the driver and of its own Ray workers during it (the provider's
   model replicas; every other worker for Ray Data), bytes of input read
   during it (every byte the driver and the Ray workers read, input and libraries), and
   whether the sink holds every id exactly once.
3. ``plan``: plan time and peak RSS over one large JSONL file (SCALE_PLAN_BIG_GB) and over
   many small files (SCALE_PLAN_FILES locally, SCALE_PLAN_FILES_S3 on S3).
4. ``shards``: SCALE_MANY_SHARDS small shards through a real scheduler (LocalExecutor on
   PostgreSQL, parallelism 4, ``tests/deployment/harness.py``), one mapped task per shard and
   SCALE_SHARDS_PER_TASK shards per task, against the same shards run by the core without
   Airflow on the same Ray head: wall time, Airflow's cost per mapped task, and the gap between
   two commits (how long a replica waits between shards).

SCALE_SECTIONS picks sections (default ``io,resume,plan,shards``). Ratios are measured side by side in
one run; on a shared machine, run it alone.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from airflow_batch_provider.core.events import EventKind, parse_events  # noqa: E402
from benchmarks.run import RayHead, _find_token  # noqa: E402,F401  (the same Ray head set-up as `make bench`)

WORK = os.environ.get("SCALE_DIR", os.path.join(ROOT, ".bench-scale"))
ROWS = int(os.environ.get("SCALE_ROWS", "10000000"))
FILES = int(os.environ.get("SCALE_FILES", "10"))
ROWS_PER_SHARD = int(os.environ.get("SCALE_ROWS_PER_SHARD", "250000"))
BATCH = int(os.environ.get("SCALE_BATCH_SIZE", "65536"))
RESUME_ROWS = [int(x) for x in os.environ.get("SCALE_RESUME_ROWS", "1000000,10000000").split(",") if x]
PLAN_BIG_GB = float(os.environ.get("SCALE_PLAN_BIG_GB", "5"))
PLAN_FILES = int(os.environ.get("SCALE_PLAN_FILES", "100000"))
PLAN_FILES_S3 = int(os.environ.get("SCALE_PLAN_FILES_S3", "20000"))
IO_PER_TASK = int(os.environ.get("SCALE_IO_SHARDS_PER_TASK", "10"))
SECTIONS = os.environ.get("SCALE_SECTIONS", "io,resume,plan,shards").split(",")
MANY_SHARDS = int(os.environ.get("SCALE_MANY_SHARDS", "1000"))
MANY_PER_TASK = int(os.environ.get("SCALE_SHARDS_PER_TASK", "20"))
WITH_S3 = os.environ.get("SCALE_S3", "1") == "1"
CPUS = int(os.environ.get("SCALE_CPUS", str(min(2, os.cpu_count() or 1))))
BIN = os.path.dirname(sys.executable)
MB = 1 << 20


def log(message: str) -> None:
    print(f"[scale] {message}", flush=True)


# -- data ----------------------------------------------------------------------------------------
def generate(directory: str, rows: int, files: int, fmt: str) -> int:
    """``files`` files of an id and a short text (~60 bytes a JSON line); returns their bytes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    words = np.array("airflow ray shard model batch vector query index parquet bucket worker commit resume".split())
    per_file = -(-rows // files)
    chunk = 500_000
    for index in range(files):
        first, last = index * per_file, min(rows, (index + 1) * per_file)
        path = f"{directory}/part-{index:04d}.{fmt}"
        writer = pq.ParquetWriter(path, pa.schema([("id", pa.int64()), ("text", pa.string())])) if fmt == "parquet" else None
        with open(path, "wb") if writer is None else _nothing() as handle:
            for start in range(first, last, chunk):
                ids = np.arange(start, min(last, start + chunk), dtype=np.int64)
                text = np.char.add(np.char.add(words[ids % len(words)], " row "), ids.astype(str))
                if writer is not None:
                    writer.write_table(pa.table({"id": ids, "text": text.astype(object)}), row_group_size=100_000)
                else:
                    lines = [f'{{"id":{i},"text":"{t}"}}\n' for i, t in zip(ids.tolist(), text.tolist(), strict=True)]
                    handle.write("".join(lines).encode())
        if writer is not None:
            writer.close()
    return sum(os.path.getsize(p) for p in glob.glob(f"{directory}/*.{fmt}"))


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def sink_ids(sink: str) -> tuple[int, int]:
    """(rows, distinct ids) in a Parquet sink, read as a user would (pyarrow.dataset)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    table = ds.dataset(sink, format="parquet", exclude_invalid_files=True).to_table(columns=["id"])
    return table.num_rows, pc.count_distinct(table.column("id")).as_py()


# -- the pyarrow copy (the ceiling) ---------------------------------------------------------------
def pyarrow_copy(source_dir: str, fmt: str, out: str, filesystem: Any = None) -> float:
    """Read every file with pyarrow, write it as Parquet: one process, streaming, no Ray."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    fs_open = (lambda p, m: filesystem.open(p, m)) if filesystem else open  # noqa: E731
    paths = sorted(filesystem.glob(f"{source_dir}/*.{fmt}")) if filesystem else sorted(glob.glob(f"{source_dir}/*.{fmt}"))
    if not filesystem:
        os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    for index, path in enumerate(paths):
        with fs_open(path, "rb") as src, fs_open(f"{out}/copy-{index:04d}.parquet", "wb") as dst:
            if fmt == "jsonl":
                reader = pj.open_json(src, read_options=pj.ReadOptions(block_size=8 * MB))
                writer = pq.ParquetWriter(dst, reader.schema)
                for batch in reader:
                    writer.write_batch(batch)
            else:
                parquet = pq.ParquetFile(src)
                writer = pq.ParquetWriter(dst, parquet.schema_arrow)
                for batch in parquet.iter_batches(batch_size=BATCH):
                    writer.write_batch(batch)
            writer.close()
    return time.perf_counter() - started


# -- the provider through airflow dags test -------------------------------------------------------
def airflow_env(source: str, sink: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW_HOME": f"{WORK}/airflow",
        "AIRFLOW__CORE__DAGS_FOLDER": f"{ROOT}/benchmarks/dags",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__MAX_MAP_LENGTH": "100000",
        "SCALE_SOURCE": source,
        "SCALE_SINK": sink,
        "SCALE_BATCH_SIZE": str(BATCH),
        "SCALE_ROWS_PER_SHARD": str(ROWS_PER_SHARD),
        "SCALE_MAX_ACTIVE": str(CPUS),
        "SCALE_DAG_SHARDS_PER_TASK": "1",
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **extra,
    }


def dags_test(env: dict[str, str], log_name: str, kill_when: Callable[[], bool] | None = None) -> tuple[float, str, bool]:
    """``airflow dags test batch_scale``: (seconds, output, killed). With ``kill_when``, its whole
    process group is SIGKILLed as soon as that returns True."""
    started = time.perf_counter()
    logfile = open(f"{WORK}/{log_name}", "w")
    proc = subprocess.Popen([f"{BIN}/airflow", "dags", "test", "batch_scale"], env=env, cwd=ROOT,
                            stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
    killed = False
    while proc.poll() is None:
        if kill_when is not None and kill_when():
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    wall = time.perf_counter() - started
    logfile.close()
    text = open(f"{WORK}/{log_name}").read()
    if not killed and "state=success" not in text:
        sys.exit(f"the DAG run failed; see {WORK}/{log_name}")
    return wall, text, killed


def computed_rows(log_text: str) -> int:
    """Rows in of the shards the run computed (not those it found committed)."""
    return sum(e["rows_in"] for e in parse_events(log_text, EventKind.SHARD_DONE) if e["status"] == "computed")


# -- measuring a run -----------------------------------------------------------------------------
class Sampler:
    """Samples, every 0.2 s, the RSS and the bytes read of a set of processes (the driver's tree
    and one way's worker processes on the Ray head): peak of the summed RSS (and of each
    side), and the growth of read bytes; the largest processes are logged."""

    def __init__(self, head: RayHead, root_pid: Callable[[], int | None], replicas: bool):
        # The Ray head is shared by both ways: each counts only its own worker processes (the
        # provider its model replicas; Ray Data every other worker), not what the other left
        # running there (Ray Data's _StatsActor and autoscaling actor stay after its driver exits).
        self.head, self.root_pid, self.replicas = head, root_pid, replicas
        self.peak_rss = 0
        self.peak_driver = self.peak_workers = 0  # each side's own peak (they need not peak together)
        self.peak_by_process: dict[int, tuple[str, int]] = {}  # pid -> (name, peak RSS)
        self._read0: dict[int, int] = {}
        self._read: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _procs(self) -> list[Any]:
        workers, driver = self._sides()
        return workers + driver

    def _sides(self) -> tuple[list[Any], list[Any]]:
        """(the Ray head's worker processes, the driver's process tree)."""
        import psutil

        workers = [p for p in self.head.processes().values()
                   if "ray::" in (line := " ".join(_cmdline(p))) and ("ray::Replica" in line) == self.replicas]
        driver = []
        pid = self.root_pid()
        if pid:
            try:
                root = psutil.Process(pid)
                driver = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return workers, driver

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            sums = []
            for side in self._sides():
                total = 0
                for proc in side:
                    try:
                        rss = proc.memory_info().rss
                        chars = proc.io_counters().read_chars
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    total += rss
                    name, peak = self.peak_by_process.get(proc.pid, ("", 0))
                    if rss > peak:
                        self.peak_by_process[proc.pid] = (name or " ".join(_cmdline(proc))[:60], rss)
                    self._read0.setdefault(proc.pid, chars)
                    self._read[proc.pid] = chars
                sums.append(total)
            self.peak_workers, self.peak_driver = max(self.peak_workers, sums[0]), max(self.peak_driver, sums[1])
            self.peak_rss = max(self.peak_rss, sum(sums))
            time.sleep(0.2)

    def __enter__(self) -> Sampler:
        for proc in self._procs():  # processes alive before the run count from here
            try:
                self._read0[proc.pid] = proc.io_counters().read_chars
            except Exception:  # noqa: BLE001 - a process that just ended
                continue
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        top = sorted(self.peak_by_process.values(), key=lambda item: -item[1])[:6]
        log("largest processes (peak RSS): " + "; ".join(f"{name} {peak / MB:,.0f} MiB" for name, peak in top))

    @property
    def bytes_read(self) -> int:
        return sum(chars - self._read0.get(pid, 0) for pid, chars in self._read.items())


def _cmdline(proc: Any) -> list[str]:
    try:
        return proc.cmdline()
    except Exception:  # noqa: BLE001
        return []


# -- sections ------------------------------------------------------------------------------------
def section_io(head: RayHead) -> list[str]:
    lines = []
    for fmt in ("jsonl", "parquet"):
        source = f"{WORK}/io-{fmt}"
        size = generate(source, ROWS, FILES, fmt)
        log(f"io: {ROWS} rows of {fmt}, {size / MB:.0f} MB in {FILES} files")
        copy_s = pyarrow_copy(source, fmt, f"{WORK}/io-copy-{fmt}")
        for per_task in dict.fromkeys((1, IO_PER_TASK)):
            sink = f"{WORK}/io-out-{fmt}-{per_task}"
            env = airflow_env(f"{source}/*.{fmt}", sink, SCALE_DAG_SHARDS_PER_TASK=str(per_task))
            wall, text, _ = dags_test(env, f"io-{fmt}-{per_task}.log")
            manifest = json.load(open(f"{sink}/_SUCCESS"))
            assert manifest["rows_out"] == ROWS, manifest["rows_out"]
            lines.append(_io_row(f"local {fmt}, {per_task}/task", ROWS, size, copy_s, manifest["elapsed_seconds"], wall))
        core_s = _core_io(f"{source}/*.{fmt}", fmt, f"{WORK}/io-out-{fmt}-core")
        lines.append(_io_row(f"local {fmt}, core alone", ROWS, size, copy_s, core_s, core_s))
        if WITH_S3:
            lines.append(_io_s3(fmt, source, size))
        shutil.rmtree(f"{WORK}/io-copy-{fmt}", ignore_errors=True)
    return lines


CORE_IO_CHILD = """
import sys, time
sys.path.insert(0, %r)
from airflow_batch_provider.core import api
from airflow_batch_provider.core.execution.runner import ShardRunner
spec = api.JobSpec(source=sys.argv[1], sink=sys.argv[2], predictor="benchmarks.identity:Identity", source_format=sys.argv[3],
                     batch_format="pyarrow", batch_size=%d, rows_per_shard=%d)
started = time.perf_counter()
job = api.plan(spec)
runner = ShardRunner(spec)
for number, shard in enumerate(job.pending):
    runner.run(shard, api.new_attempt("core-io-%%d" %% number))
api.finalize(spec)
print(time.perf_counter() - started)
"""


def _core_io(source: str, fmt: str, sink: str) -> float:
    """Plan -> every shard -> finalize by the core in one fresh process, without Airflow or Ray:
    the provider's own per-row work (reading, checking, writing, committing) alone."""
    shutil.rmtree(sink, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", CORE_IO_CHILD % (ROOT, BATCH, ROWS_PER_SHARD), source, sink, fmt],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _io_row(name: str, rows: int, size: int, copy_s: float, prov_s: float, wall: float) -> str:
    return (f"{name:<22} pyarrow copy {copy_s:7.1f} s {rows / copy_s:>11,.0f} rows/s {size / MB / copy_s:6.1f} MB/s | provider "
            f"{prov_s:7.1f} s {rows / prov_s:>11,.0f} rows/s {size / MB / prov_s:6.1f} MB/s | {copy_s / prov_s:.3f}x "
            f"(whole command {wall:.1f} s)")


def _io_s3(fmt: str, source: str, size: int) -> str:
    import s3fs

    from tests.s3_server import S3Server

    server = S3Server.start()
    try:
        bucket = server.new_bucket("scale")
        fs = s3fs.S3FileSystem(**server.storage_options())
        fs.put(f"{source}/", f"{bucket}/in/", recursive=True)
        copy_s = pyarrow_copy(f"{bucket}/in", fmt, f"{bucket}/copy", filesystem=fs)
        env = airflow_env(f"s3://{bucket}/in/*.{fmt}", f"s3://{bucket}/out", SCALE_CONN_ID="scale_s3",
                          AIRFLOW_CONN_SCALE_S3=server.connection_json())
        wall, _, _ = dags_test(env, f"io-s3-{fmt}.log")
        manifest = json.loads(fs.cat(f"{bucket}/out/_SUCCESS"))
        assert manifest["rows_out"] == ROWS
        return _io_row(f"S3 {fmt}, 1/task", ROWS, size, copy_s, manifest["elapsed_seconds"], wall)
    finally:
        server.stop()


RAY_DATA_DRIVER = """
import os, sys, glob, time
import ray
from ray.data.checkpoint import CheckpointConfig
source, sink, checkpoint, counts = sys.argv[1:5]
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
ctx = ray.data.DataContext.get_current()
ctx.checkpoint_config = CheckpointConfig(id_column="id", checkpoint_path=checkpoint)
def identity(batch):
    with open(os.path.join(counts, str(os.getpid())), "a") as handle:
        handle.write(f"{batch.num_rows}\\n")
    return batch
started = time.perf_counter()
ray.data.read_json(sorted(glob.glob(source))).map_batches(identity, batch_format="pyarrow", batch_size=%d).write_parquet(sink)
print("RAY_DATA_SECONDS", time.perf_counter() - started)
"""


def ray_data_run(source: str, sink: str, checkpoint: str, counts: str, log_name: str,
                 kill_when: Callable[[], bool] | None = None, sampler_head: RayHead | None = None) -> dict[str, Any]:
    os.makedirs(counts, exist_ok=True)
    logfile = open(f"{WORK}/{log_name}", "w")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", RAY_DATA_DRIVER % BATCH, source, sink, checkpoint, counts], cwd=ROOT,
                            stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
    sampler = Sampler(sampler_head, lambda: proc.pid, replicas=False) if sampler_head else None
    if sampler:
        sampler.__enter__()
    killed = False
    while proc.poll() is None:
        if kill_when is not None and kill_when():
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    wall = time.perf_counter() - started
    if sampler:
        sampler.__exit__()
    logfile.close()
    if not killed and proc.returncode != 0:
        sys.exit(f"Ray Data run failed; see {WORK}/{log_name}")
    return {"wall": wall, "killed": killed, "peak_rss": sampler.peak_rss if sampler else 0,
            "peak_driver": sampler.peak_driver if sampler else 0, "peak_workers": sampler.peak_workers if sampler else 0,
            "bytes_read": sampler.bytes_read if sampler else 0}


def _counted(counts: str) -> int:
    return sum(int(x) for path in glob.glob(f"{counts}/*") for x in open(path).read().split())


def _rows_in_sink(sink: str) -> int:
    import pyarrow.parquet as pq

    rows = 0
    for path in glob.glob(f"{sink}/*.parquet"):
        try:
            rows += pq.read_metadata(path).num_rows
        except Exception:  # noqa: BLE001 - a file being written
            continue
    return rows


def section_resume(head: RayHead) -> list[str]:
    lines = []
    for rows in RESUME_ROWS:
        source = f"{WORK}/resume-{rows}"
        size = generate(source, rows, FILES, "jsonl")
        log(f"resume: {rows} rows, {size / MB:.0f} MB of JSONL")
        # Ray Data with CheckpointConfig: killed at about half, then resumed.
        sink, ckpt, counts = f"{WORK}/rd-out-{rows}", f"{WORK}/rd-ckpt-{rows}", f"{WORK}/rd-counts-{rows}"
        first = ray_data_run(f"{source}/*.jsonl", sink, ckpt, counts, f"rd-{rows}-1.log",
                             kill_when=lambda sink=sink, rows=rows: _rows_in_sink(sink) >= rows // 2)
        before_rows, before_counted = _rows_in_sink(sink), _counted(counts)
        second = ray_data_run(f"{source}/*.jsonl", sink, ckpt, f"{counts}-resume", f"rd-{rows}-2.log", sampler_head=head)
        rd_again = _counted(f"{counts}-resume") - (rows - before_rows)
        rd_total, rd_distinct = sink_ids(sink)
        lines.append(_resume_row("Ray Data", rows, size, first["killed"], before_rows, second, rd_again, rd_total, rd_distinct,
                                 before_counted))
        # The provider: airflow dags test killed (its process group) at about half, then rerun.
        sink = f"{WORK}/prov-out-{rows}"
        env = airflow_env(f"{source}/*.jsonl", sink)
        sentinels = f"{sink}/_checkpoint/shards"
        planned = -(-rows // ROWS_PER_SHARD)
        _, _, killed = dags_test(env, f"prov-{rows}-1.log",
                                 kill_when=lambda s=sentinels, n=planned: len(glob.glob(f"{s}/*.json")) >= n // 2)
        time.sleep(2)  # shards already on the replicas may still commit: they count as committed before the resume
        committed_rows = sum(json.load(open(p))["rows_in"] for p in glob.glob(f"{sentinels}/*.json"))
        holder: dict[str, int | None] = {"pid": None}
        with Sampler(head, lambda holder=holder: holder["pid"], replicas=True) as sampler:
            wall, text, _ = _dags_test_tracking(env, f"prov-{rows}-2.log", holder)
        again = computed_rows(text) - (rows - committed_rows)
        total, distinct = sink_ids(sink)
        stats = {"wall": wall, "peak_rss": sampler.peak_rss, "peak_driver": sampler.peak_driver,
                 "peak_workers": sampler.peak_workers, "bytes_read": sampler.bytes_read}
        lines.append(_resume_row("provider", rows, size, killed, committed_rows, stats, again, total, distinct, None))
    return lines


def _dags_test_tracking(env: dict[str, str], log_name: str, holder: dict[str, int | None]) -> tuple[float, str, bool]:
    started = time.perf_counter()
    with open(f"{WORK}/{log_name}", "w") as logfile:
        proc = subprocess.Popen([f"{BIN}/airflow", "dags", "test", "batch_scale"], env=env, cwd=ROOT,
                                stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
        holder["pid"] = proc.pid
        proc.wait()
    text = open(f"{WORK}/{log_name}").read()
    if "state=success" not in text:
        sys.exit(f"the DAG run failed; see {WORK}/{log_name}")
    return time.perf_counter() - started, text, False


def _resume_row(name: str, rows: int, size: int, killed: bool, done_before: int, run: dict[str, Any], again: int,
                total: int, distinct: int, counted_before: int | None) -> str:
    once = "yes" if total == distinct == rows else f"NO ({total} rows, {distinct} distinct ids of {rows})"
    extra = f", rows processed before the kill {counted_before}" if counted_before is not None else ""
    return (f"{name:<9} {rows:>11,} rows: killed={killed} with {done_before:,} rows in the sink{extra}; resume {run['wall']:.1f} s, "
            f"peak RSS {run['peak_rss'] / MB:,.0f} MiB (driver {run['peak_driver'] / MB:,.0f}, Ray workers "
            f"{run['peak_workers'] / MB:,.0f}), read {run['bytes_read'] / MB:,.0f} MiB (input is {size / MB:,.0f}), "
            f"rows computed again {again:,}; every row once: {once}")


PLAN_CHILD = """
import json, sys, time
sys.path.insert(0, %r)
from airflow_batch_provider.core import api
spec = api.JobSpec(source=sys.argv[1], sink=sys.argv[2], predictor="benchmarks.identity:Identity", source_format="jsonl",
                     rows_per_shard=%d)
options = json.loads(sys.argv[3]) or None
started = time.perf_counter()
job = api.plan(spec, options)
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would report this benchmark's
# own peak from before it started the planner.
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - started, "shards": len(job.plan.shards), "peak_rss_kib": peak}))
"""


def _plan(source: str, sink: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", PLAN_CHILD % (ROOT, ROWS_PER_SHARD), source, sink, json.dumps(options)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def section_plan() -> list[str]:
    lines = []
    big = f"{WORK}/plan-big"
    os.makedirs(big, exist_ok=True)
    block = "".join(f'{{"id":{i},"text":"row {i} of a large file"}}\n' for i in range(200_000)).encode()
    target = int(PLAN_BIG_GB * (1 << 30))
    with open(f"{big}/big.jsonl", "wb") as handle:
        while handle.tell() < target:
            handle.write(block)
    size = os.path.getsize(f"{big}/big.jsonl")
    result = _plan(f"{big}/big.jsonl", f"{WORK}/plan-big-out")
    lines.append(f"plan, one {size / (1 << 30):.1f} GiB JSONL file (local): {result['seconds']:.1f} s "
                 f"({size / MB / result['seconds']:.0f} MB/s), {result['shards']} shards, peak RSS {result['peak_rss_kib'] / 1024:.0f} MiB")
    small = f"{WORK}/plan-small"
    os.makedirs(small, exist_ok=True)
    for index in range(PLAN_FILES):
        with open(f"{small}/f-{index:06d}.jsonl", "w") as handle:
            handle.write(f'{{"id":{index},"text":"row"}}\n')
    result = _plan(small, f"{WORK}/plan-small-out")
    lines.append(f"plan, {PLAN_FILES:,} small JSONL files (local): {result['seconds']:.1f} s, {result['shards']} shards, "
                 f"peak RSS {result['peak_rss_kib'] / 1024:.0f} MiB")
    if WITH_S3:
        lines.extend(_plan_s3(f"{big}/big.jsonl", small))
    return lines


def _plan_s3(big_file: str, small_dir: str) -> list[str]:
    import s3fs

    from tests.s3_server import S3Server

    server = S3Server.start()
    try:
        bucket = server.new_bucket("plan")
        fs = s3fs.S3FileSystem(**server.storage_options())
        fs.put(big_file, f"{bucket}/big/big.jsonl")
        fs.pipe({f"{bucket}/small/f-{index:06d}.jsonl": f'{{"id":{index},"text":"row"}}\n'.encode() for index in range(PLAN_FILES_S3)})
        lines = []
        for name, source in (("one large JSONL file", f"s3://{bucket}/big/big.jsonl"),
                             (f"{PLAN_FILES_S3:,} small JSONL files", f"s3://{bucket}/small/")):
            result = _plan(source, f"s3://{bucket}/out-{len(lines)}", server.storage_options())
            lines.append(f"plan, {name} (S3): {result['seconds']:.1f} s, {result['shards']} shards, "
                         f"peak RSS {result['peak_rss_kib'] / 1024:.0f} MiB")
        return lines
    finally:
        server.stop()


MANY_DAG = """
from datetime import timedelta

import pendulum
from airflow.sdk import dag
from airflow_batch_provider import BatchSpec, batch_inference

spec = BatchSpec(source={source!r}, sink={sink!r}, predictor="benchmarks.identity:Identity", batch_format="pyarrow",
                 rows_per_shard={rows_per_shard}, num_cpus=1, num_replicas=2)


@dag(dag_id={dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def many():
    # Retries: a task process that crashes while it connects to Ray (seen on the loaded 2-core
    # machine) is retried like any Airflow task; the benchmark counts the retries it needed.
    batch_inference(spec, group_id="scale", max_active_shards=4, shards_per_task={per_task}, shard_retries=2,
                    shard_kwargs={{"retry_delay": timedelta(seconds=1)}})


many()
"""


def _commit_gaps(sink: str) -> float:
    """Median seconds between consecutive commits (the replicas' wait between shards, plus a shard)."""
    import statistics

    stamps = sorted(json.load(open(p))["committed_at"] for p in glob.glob(f"{sink}/_checkpoint/shards/*.json"))
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return statistics.median(gaps) if gaps else float("nan")


def section_shards() -> list[str]:
    from tests.deployment.harness import AirflowClient, Deployment

    rows_per_shard = 20
    source = f"{WORK}/many-in"
    generate(source, MANY_SHARDS * rows_per_shard, 1, "jsonl")

    class ManyTasks(Deployment):
        def airflow_env(self) -> dict[str, str]:
            env = super().airflow_env()
            env.update(AIRFLOW__CORE__MAX_MAP_LENGTH=str(MANY_SHARDS + 1), AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG="16")
            return env

    deployment = ManyTasks(Path(f"{WORK}/deployment"), parallelism=4, ray_cpus=4)
    deployment.start()
    lines = []
    try:
        client = AirflowClient(deployment.base_url)
        timings = {}
        for per_task in (1, MANY_PER_TASK):
            dag_id = f"scale_many_{per_task}"
            sink = f"{WORK}/many-out-{per_task}"
            (deployment.dags / f"{dag_id}.py").write_text(MANY_DAG.format(
                source=f"{source}/*.jsonl", sink=sink, rows_per_shard=rows_per_shard, dag_id=dag_id, per_task=per_task))
            client.wait_dag(dag_id, timeout=300)
            client.unpause(dag_id)
            started = time.perf_counter()
            run_id = client.trigger(dag_id)
            state = client.wait_run(dag_id, run_id, timeout=3600)
            wall = time.perf_counter() - started
            assert state == "success", state
            retried = len(glob.glob(f"{deployment.root}/logs/dag_id={dag_id}/**/attempt=2.log", recursive=True))
            timings[per_task] = (wall, _commit_gaps(sink), -(-MANY_SHARDS // per_task), retried)
        core_wall, core_gap = _core_many(deployment, f"{source}/*.jsonl", f"{WORK}/many-out-core", rows_per_shard)
        for per_task, (wall, gap, tasks, retried) in timings.items():
            lines.append(f"{MANY_SHARDS} shards in {tasks} mapped tasks ({per_task} per task): {wall:.1f} s, "
                         f"{(wall - core_wall) / tasks:.2f} s of Airflow per mapped task, median gap between commits {gap:.3f} s, "
                         f"{retried} task(s) retried")
        lines.append(f"{MANY_SHARDS} shards, core without Airflow (one after another, same Ray head): {core_wall:.1f} s, "
                     f"median gap between commits {core_gap:.3f} s")
    finally:
        deployment.stop()
    return lines


def _core_many(deployment: Any, source: str, sink: str, rows_per_shard: int) -> tuple[float, float]:
    code = f"""
import json, sys, time
sys.path.insert(0, {ROOT!r})
from airflow_batch_provider.core import api
spec = api.JobSpec(source={source!r}, sink={sink!r}, predictor="benchmarks.identity:Identity", batch_format="pyarrow",
                     rows_per_shard={rows_per_shard}, num_cpus=1, num_replicas=2)
api.connect(api.RayTarget(address={deployment.ray_address!r}, token={deployment.ray_token!r}))
started = time.perf_counter()
pool = api.ReplicaPool(spec)
for shard in api.plan(spec).pending:
    pool.result(pool.submit([shard], api.new_attempt()))
api.finalize(spec)
print("CORE", time.perf_counter() - started)
"""
    out = subprocess.run([sys.executable, "-c", code], env=deployment.base_env(), capture_output=True, text=True, check=True)
    return float(re.search(r"CORE ([\d.]+)", out.stdout).group(1)), _commit_gaps(sink)


def main() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    log(f"sections {','.join(SECTIONS)}; {ROWS:,} rows for io, {RESUME_ROWS} for resume; {ROWS_PER_SHARD:,} rows/shard; "
        f"batch {BATCH}; {CPUS} CPUs")
    subprocess.run([f"{BIN}/airflow", "db", "migrate"], env=airflow_env("", ""), check=True, capture_output=True)
    results: dict[str, list[str]] = {}
    took: dict[str, float] = {}
    started = time.perf_counter()

    def run(title: str, section: Callable[[], list[str]]) -> None:
        begun = time.perf_counter()
        results[title] = section()
        took[title] = time.perf_counter() - begun
        log(f"{title}: done in {took[title]:.0f} s")

    head = RayHead(f"/tmp/abp-scale-ray-{os.getpid()}")
    head.start()
    try:
        if "io" in SECTIONS:
            run("I/O ceiling (identity predictor; input MB/s)", lambda: section_io(head))
        if "resume" in SECTIONS:
            run("resume after a SIGKILL at about half", lambda: section_resume(head))
    finally:
        head.stop()
    if "plan" in SECTIONS:
        run("planning cost", section_plan)
    if "shards" in SECTIONS:
        run("many shards through a real scheduler (LocalExecutor on PostgreSQL, parallelism 4)", section_shards)
    print()
    print(f"machine: {_machine()}")
    for title, lines in results.items():
        print(f"== {title} ({took[title]:.0f} s)")
        for line in lines:
            print(line)
    print(f"== all sections: {time.perf_counter() - started:.0f} s")


def _machine() -> str:
    import platform

    import psutil

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.machine())
    return f"{model}, {os.cpu_count()} cores, {psutil.virtual_memory().total / (1 << 30):.0f} GiB RAM, Python {platform.python_version()}"


if __name__ == "__main__":
    main()
