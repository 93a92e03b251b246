"""What the tests share that is not a fixture (the fixtures are in ``conftest.py``).

Test modules import from here, or from the servers and harnesses beside it (``s3_server``,
``ray_cluster``, ``integration/dagtest``, ``deployment/harness``), never from one another.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.execution.runner import ShardRunner
from airflow_batch_provider.core.spec import JobSpec, infer_format
from airflow_batch_provider.core.stores.urls import is_remote, local_path_of, split_s3_url

#: The repository's root (what ``PYTHONPATH`` needs for ``tests.predictors`` on Ray workers).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Where this Python's console scripts (``airflow``, ``ray``) are.
BIN = os.path.dirname(sys.executable)


# -- input data -------------------------------------------------------------------------------
def rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": i, "value": float(i) * 0.5, "text": f"text {i}"} for i in range(start, start + n)]


def write_jsonl(path: str, records: list[dict], *, trailing_newline: bool = True) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    body = "\n".join(json.dumps(r) for r in records)
    with open(path, "w") as handle:
        handle.write(body + ("\n" if trailing_newline and records else ""))
    return path


def write_parquet(path: str, records: list[dict], *, row_group_size: int = 100) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def parquet_bytes(ids: range, row_group_size: int = 50) -> bytes:
    """A Parquet file of ``id`` and ``value`` columns, as bytes (an S3 object's body)."""
    table = pa.table({"id": list(ids), "value": [i * 0.5 for i in ids]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    return buffer.getvalue()


# -- specs ------------------------------------------------------------------------------------
#: Path parts a plan skips (``_SUCCESS``, ``_staging/``, ``.crc``).
HIDDEN = ("_", ".")


def make_spec(source: str, sink: str, *, spec_type: type[JobSpec] = JobSpec, **fields: Any) -> JobSpec:
    """The tests' one spec factory: ``tests.predictors:Doubler`` over shards of 100 rows, the
    source's format read from its files (:func:`source_format_of`) unless ``fields`` say it.
    ``spec_type``: the core's ``JobSpec`` or the Airflow layer's."""
    fields.setdefault("predictor", "tests.predictors:Doubler")
    fields.setdefault("rows_per_shard", 100)
    if fields.get("source_format") is None:
        fields["source_format"] = source_format_of(source)
    return spec_type(source=source, sink=sink, **fields)


def source_format_of(source: str) -> str | None:
    """The format a local source directory's files share (by extension), else None: a path
    or glob that names its extension is left to the spec's own inference."""
    if is_remote(source) or infer_format(source):
        return None
    path = local_path_of(source)
    if not os.path.isdir(path):
        return None
    found = set()
    for _, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(HIDDEN)]  # what a plan skips
        found.update(infer_format(name) for name in names if not name.startswith(HIDDEN))
    return found.pop() if len(found) == 1 and None not in found else None


def slow_doubler_spec(source: str, tmp_path, *, sleep_s: float, **fields: Any) -> JobSpec:
    """``tests.predictors:SlowDoubler`` into ``tmp_path/out``, on one replica unless ``fields``
    say more: shards of 10 rows in batches of 5, each batch ``sleep_s`` long."""
    return make_spec(source, str(tmp_path / "out"), **{
        "predictor": "tests.predictors:SlowDoubler", "predictor_kwargs": {"sleep_s": sleep_s}, "batch_size": 5,
        "rows_per_shard": 10, "num_replicas": 1, **fields})


def spec_on(bucket: str, **fields: Any) -> JobSpec:
    """A job reading ``s3://{bucket}/in/`` (Parquet, unless ``fields`` say otherwise) into ``s3://{bucket}/out``."""
    return make_spec(f"s3://{bucket}/in/", f"s3://{bucket}/out", **{"source_format": "parquet", **fields})


# -- running a job ----------------------------------------------------------------------------
def run_all(spec: JobSpec, options: dict[str, Any] | None = None) -> list:
    """Plan, then run every pending shard in this process (no finalize); the shards' results."""
    runner = ShardRunner(spec, options)
    return [runner.run(s, new_attempt()) for s in plan_job(spec, JobStorage.for_spec(spec, options)).pending]


CRASH_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from airflow_batch_provider.core.spec import JobSpec
from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.execution.runner import ShardRunner
spec = JobSpec.from_dict({spec!r})
storage = JobStorage.for_spec(spec, {options!r})
runner = ShardRunner(spec, {options!r})
for shard in plan_job(spec, storage).pending:
    runner.run(shard, new_attempt())
finalize_job(spec, storage)
"""


def run_killed_at(spec: JobSpec, point: str, marker, options=None) -> subprocess.CompletedProcess:
    """A whole job (plan, every shard, finalize) in a child process that SIGKILLs itself at
    ``point``, once (``marker`` records that it fired)."""
    env = {**os.environ, "ABP_FAILPOINTS": f"{point}=kill@{marker}"}
    script = CRASH_SCRIPT.format(root=ROOT, spec=spec.to_dict(), options=options)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)


def two_runs_at_once(spec: JobSpec, options=None) -> list[tuple[list[str], int]]:
    """Two runs of one spec, each planning, computing its pending shards and finalizing, in
    lock step (both plan before either computes); (shard statuses, rows_out) per run."""
    barrier, results, errors = threading.Barrier(2), [], []

    def one_run():
        try:
            storage = JobStorage.for_spec(spec, options)
            job = plan_job(spec, storage)
            barrier.wait()
            runner = ShardRunner(spec, options)
            statuses = [runner.run(s, new_attempt()).status for s in job.pending]
            barrier.wait()
            results.append((statuses, finalize_job(spec, storage)["rows_out"]))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


# -- what a job left --------------------------------------------------------------------------
def sink_ids(sink: str | os.PathLike) -> list[int]:
    """The ids in a local Parquet sink's parts, sorted, repeats kept ([] before the first part)."""
    sink = os.fspath(sink)
    if not os.path.isdir(sink) or not any(n.startswith("part-") for n in os.listdir(sink)):
        return []
    return sorted(ds.dataset(sink, format="parquet").to_table(columns=["id"]).column("id").to_pylist())


def sink_table(sink: str) -> pa.Table:
    """A local Parquet sink's rows, by id."""
    return ds.dataset(sink, format="parquet").to_table().sort_by("id")


def logged_ids(path: str | os.PathLike) -> list[int]:
    """The ids a predictor's ``calls_log`` recorded, one call a line ([] when it never ran)."""
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [i for line in handle for i in json.loads(line)]


# -- S3 (the ``s3_server`` fixture's server) --------------------------------------------------
def put(s3_server, bucket: str, key: str, body: bytes) -> None:
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=body)


def uploads(s3_server, bucket: str) -> list[dict]:
    """The multipart uploads in progress in ``bucket``."""
    return s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def staged(store, url: str, data: bytes):
    """``data`` staged at ``url`` by ``store`` (an ``S3Store``), not published."""
    part = store.open_staged(url)
    part.stream.write(data)
    part.finish()
    return part


def read_sink(s3_server, sink: str) -> pa.Table:
    """An S3 Parquet sink's rows."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    return ds.dataset(split_s3_url(sink)[0] + "/" + split_s3_url(sink)[1], filesystem=fs, format="parquet").to_table()


# -- an Airflow task's context, in memory -----------------------------------------------------
class StateStore(dict):
    """Airflow's ``task_state_store``, in memory."""

    def set(self, key, value):
        self[key] = value


class FakeTI(SimpleNamespace):
    """A task instance: its ids, try number and its XComs by key (``xcom``: ``pushed``, then
    what it pushes; ``xcom_pull`` reads them whichever task is named)."""

    def __init__(self, pushed: dict[str, Any] | None = None, **ids: Any) -> None:
        super().__init__(xcom=dict(pushed or {}), stats_tags={}, **ids)

    def xcom_push(self, key, value):
        self.xcom[key] = value

    def xcom_pull(self, task_ids=None, key="return_value"):
        return self.xcom.get(key)


def task_context(store: StateStore | None = None, *, try_number: int = 1, **ti_fields: Any) -> dict[str, Any]:
    """The context an operator's ``execute`` gets: ``ti``, a :class:`FakeTI` of map index 0 of
    task ``batch.shard`` in run ``r`` of DAG ``d`` unless ``ti_fields`` say otherwise, and
    ``task_state_store`` (``store``, or a new empty one)."""
    ti = FakeTI(**{"dag_id": "d", "run_id": "r", "task_id": "batch.shard", "map_index": 0, "try_number": try_number, **ti_fields})
    return {"ti": ti, "task_state_store": store if store is not None else StateStore()}


# -- processes, ports, HTTP -------------------------------------------------------------------
def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now (held open together so they are distinct)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def http_request(url: str, *, token: str | None = None, data: dict | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET, or of a JSON POST of ``data``, with a bearer ``token``."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(data).encode() if data else None, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_healthy(server: subprocess.Popen, base: str, log_path: str, timeout: float) -> None:
    """Wait until the api-server at ``base`` answers its health check (fail if it exits)."""
    import pytest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"api-server exited: {open(log_path).read()[-3000:]}")
        try:
            if http_request(f"{base}/api/v2/monitor/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(1)


@contextlib.contextmanager
def api_server(env: dict[str, str], log_path: str, *, timeout: float, cwd: str | None = None) -> Iterator[str]:
    """An ``airflow api-server`` on a free port, with ``env`` and its base URL set, once it
    answers its health check; yields the base URL, and stops the server's process group after."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen([os.path.join(BIN, "airflow"), "api-server", "-p", str(port)],
                                  env={**env, "AIRFLOW__API__BASE_URL": base}, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, cwd=cwd)
        try:
            wait_healthy(server, base, log_path, timeout)
            yield base
        finally:
            os.killpg(server.pid, 15)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)


# -- code shipped to Ray with runtime_env -------------------------------------------------------
SHIPPED_PREDICTOR = '''
"""A predictor that exists only in a directory shipped with runtime_env (never on PYTHONPATH)."""
import os


class Scaler:
    """``value * ABP_FACTOR`` (an env var the runtime_env may set; 3 without it)."""

    def __call__(self, batch):
        factor = float(os.environ.get("ABP_FACTOR", "3"))
        return {"id": batch["id"], "value": batch["value"] * factor}
'''


def write_shipped_predictor(directory: str | os.PathLike) -> str:
    """Write :data:`SHIPPED_PREDICTOR` as a module of a fresh name (no process has imported it)
    in ``directory``; returns its ``predictor`` path (``module:Scaler``)."""
    import uuid

    module = f"abp_shipped_{uuid.uuid4().hex[:8]}"
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{module}.py"), "w") as handle:
        handle.write(SHIPPED_PREDICTOR)
    return f"{module}:Scaler"
