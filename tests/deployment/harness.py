"""A real Airflow 3.3 deployment for end-to-end tests: Postgres, the four components, a Ray head.

Everything runs from this repository (``PYTHONPATH``) with the Python that runs pytest:

* a fresh PostgreSQL database on ``127.0.0.1:5432`` (trust auth, user ``postgres``), dropped
  at the end;
* a Ray head (``ray start --head``) on free ports with its own ``--temp-dir`` (so nobody
  else's ``ray.init()`` finds it) and its own auth token (``RAY_AUTH_TOKEN``, so
  ``~/.ray/auth_token`` is never written); tasks get address and token through the
  ``ray_batch_default`` connection (``AIRFLOW_CONN_RAY_BATCH_DEFAULT``);
* ``airflow api-server``, ``scheduler``, ``dag-processor`` and ``triggerer`` with the
  LocalExecutor, or with the CeleryExecutor (``executor="CeleryExecutor"``) on the Redis server
  at ``127.0.0.1:6379`` (a queue of its own) and ``celery_workers`` Celery workers, each in a
  session of its own so that one can be killed alone;

each started in its own session so that it, and whatever it forks, is stopped by process
group at the end. Tests talk to Airflow only through the REST API v2 (:class:`AirflowClient`).

The scenarios share, from here too: ``running_deployment`` (a deployment running their DAGs,
its timings kept for the report) and what they read of a run (its units, the predictor's
calls, the committed shards) and do to one (``kill_only_the_scheduler``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.helpers import BIN, ROOT, free_port, logged_ids, sink_ids, write_jsonl

PG_DSN = os.environ.get("ABP_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")
ADMIN_PASSWORD = "admin-pw"
TERMINAL = {"success", "failed"}
#: Postgres ends a session idle inside a transaction this long (0: never, Postgres' default).
IDLE_IN_TRANSACTION_TIMEOUT = os.environ.get("ABP_TEST_IDLE_IN_TRANSACTION_TIMEOUT", "60s")


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _pg_connect(dbname: str = "postgres"):
    import psycopg2

    rest = PG_DSN.split("://", 1)[1]
    userhost, _, _ = rest.partition("/")
    user, _, hostport = userhost.rpartition("@")
    host, _, port = hostport.partition(":")
    conn = psycopg2.connect(host=host, port=int(port or 5432), user=user or "postgres", dbname=dbname)
    conn.autocommit = True
    return conn


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    pgid: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Deployment:
    root: Path
    parallelism: int = 3
    ray_cpus: int = 16
    executor: str = "LocalExecutor"
    celery_workers: int = 0
    celery_concurrency: int = 2
    #: seconds without a heartbeat before the scheduler takes a running task for dead
    heartbeat_timeout_s: int = 60
    queue: str = field(default_factory=lambda: f"abp-{uuid.uuid4().hex[:8]}")
    procs: dict[str, Proc] = field(default_factory=dict)
    old_pgids: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    db_name: str = ""
    api_port: int = 0
    ray_address: str = ""
    ray_token: str = ""
    ray_pgid: int = 0

    # -- paths -------------------------------------------------------------------------
    @property
    def home(self) -> Path:
        return self.root / "airflow"

    @property
    def dags(self) -> Path:
        return self.root / "dags"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # -- start -------------------------------------------------------------------------
    def start(self) -> None:
        for d in (self.home, self.dags, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self.create_database()
        self.start_ray()
        self.timings["ray_head_s"] = time.monotonic() - started
        tick = time.monotonic()
        self.airflow("db", "migrate", timeout=300)
        self.timings["db_migrate_s"] = time.monotonic() - tick
        tick = time.monotonic()
        for component in ("api-server", "scheduler", "dag-processor", "triggerer"):
            self.start_component(component)
        for index in range(self.celery_workers):
            self.start_celery_worker(index)
        self.wait_healthy()
        for index in range(self.celery_workers):
            self.wait_celery_worker(index)
        self.timings["airflow_components_s"] = time.monotonic() - tick
        self.timings["total_startup_s"] = time.monotonic() - started

    def create_database(self) -> None:
        self.db_name = f"abp_deploy_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        conn = _pg_connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{self.db_name}"')
                # The workaround for a scheduler killed alone under the LocalExecutor (docs/deployment.md,
                # "Executors: Local and Celery"): its forked workers keep its DB socket
                # open, so its open transaction and row locks outlive it until Postgres ends them.
                cur.execute(f"ALTER DATABASE \"{self.db_name}\" SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_TIMEOUT}'")
        finally:
            conn.close()

    def drop_database(self) -> None:
        if not self.db_name:
            return
        conn = _pg_connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (self.db_name,))
                cur.execute(f'DROP DATABASE IF EXISTS "{self.db_name}"')
        finally:
            conn.close()

    def start_ray(self, attempts: int = 3) -> None:
        """Start the Ray head. Its ports come from ``free_port()``, which another process can
        take before Ray binds one (Ray's GCS then dies with "Address already in use"): a head
        that exits before it is up is started again on fresh ports."""
        self.ray_token = secrets.token_hex(32)
        for attempt in range(1, attempts + 1):
            proc, address_file = self._spawn_ray_head()
            wait_for(lambda proc=proc, address_file=address_file: _up_or_exited(proc, address_file), 120, what="the Ray head")
            if address_file.exists() and address_file.read_text().strip():
                break
            if attempt == attempts:
                raise RuntimeError(f"the Ray head exited ({proc.popen.returncode}); log tail:\n{proc.log.read_text()[-3000:]}")
            shutil.rmtree(address_file.parent, ignore_errors=True)
        env = {**self.base_env(), "RAY_AUTH_MODE": "token"}
        self.ray_address = address_file.read_text().strip()
        probe = (
            "import ray; ray.init(address=%r, logging_level='ERROR'); "
            "assert ray.cluster_resources().get('CPU'); print('ray ok')" % self.ray_address
        )
        out = subprocess.run(
            [sys.executable, "-c", probe], env={**env, "RAY_AUTH_TOKEN": self.ray_token},
            capture_output=True, text=True, timeout=120,
        )
        if "ray ok" not in out.stdout:
            raise RuntimeError(f"cannot connect to the Ray head at {self.ray_address}: {out.stderr[-2000:]}")

    def _spawn_ray_head(self) -> tuple[Proc, Path]:
        # Ray's socket paths must stay short: a temp dir under /tmp, not under pytest's tmp.
        temp_dir = Path(f"/tmp/abp-ray-{os.getpid()}-{uuid.uuid4().hex[:4]}")
        temp_dir.mkdir()
        (self.root / "ray_temp_dir").write_text(str(temp_dir))
        port = free_port()
        env = self.base_env()
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.ray_token)
        cmd = [
            os.path.join(BIN, "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", f"--port={port}", f"--temp-dir={temp_dir}",
            f"--num-cpus={self.ray_cpus}", "--num-gpus=0", "--include-dashboard=false",
            f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--ray-client-server-port={free_port()}",
            "--disable-usage-stats", "--object-store-memory=200000000",
        ]
        proc = self._spawn("ray-head", cmd, env)
        self.ray_pgid = proc.pgid
        return proc, temp_dir / "ray_current_cluster"

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "RAY_"))}
        env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env["OMP_NUM_THREADS"] = "1"
        return env

    def airflow_env(self) -> dict[str, str]:
        env = self.base_env()
        env.update(
            AIRFLOW_HOME=str(self.home),
            AIRFLOW__CORE__DAGS_FOLDER=str(self.dags),
            AIRFLOW__CORE__EXECUTOR=self.executor,
            AIRFLOW__CORE__PARALLELISM=str(self.parallelism),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__FERNET_KEY=_fernet_key(self.root),
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin",
            AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="True",
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"{PG_DSN}/{self.db_name}",
            AIRFLOW__API__BASE_URL=self.base_url,
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{self.base_url}/execution/",
            AIRFLOW__API_AUTH__JWT_SECRET=_secret(self.root, "jwt"),
            AIRFLOW__API__SECRET_KEY=_secret(self.root, "api"),
            AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(self.logs),
            # Airflow's default (30 s): a scheduler whose loop runs late on a busy 2-core machine
            # must not take itself for dead and reset its own running tasks (seen at 10 s).
            AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD="30",
            AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL="5",
            AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT=str(self.heartbeat_timeout_s),
            AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
            AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="10",
            AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC="2",
            AIRFLOW_CONN_RAY_BATCH_DEFAULT=json.dumps({"conn_type": "ray_batch", "host": self.ray_address, "password": self.ray_token}),
        )
        if self.executor == "CeleryExecutor":
            env.update(
                AIRFLOW__CELERY__BROKER_URL="redis://127.0.0.1:6379/0",
                AIRFLOW__CELERY__RESULT_BACKEND=f"db+{PG_DSN}/{self.db_name}",
                AIRFLOW__CELERY__WORKER_CONCURRENCY=str(self.celery_concurrency),
                # a queue of this deployment's own: other deployments on this Redis never take its tasks
                AIRFLOW__OPERATORS__DEFAULT_QUEUE=self.queue,
            )
        return env

    def start_celery_worker(self, index: int) -> Proc:
        """``airflow celery worker`` named ``w{index}``, on this deployment's queue, in a session
        of its own (it, its pool processes and their task processes die together when killed)."""
        name = f"celery-w{index}"
        cmd = [os.path.join(BIN, "airflow"), "celery", "worker", "--queues", self.queue, "--concurrency", str(self.celery_concurrency),
               "--celery-hostname", f"w{index}-{self.queue}@%h", "--skip-serve-logs"]
        return self._spawn(name, cmd, self.airflow_env())

    def wait_celery_worker(self, index: int, timeout: float = 180) -> None:
        proc = self.procs[f"celery-w{index}"]

        def ready():
            if proc.popen.poll() is not None:
                raise RuntimeError(f"celery worker {index} exited; log tail:\n{proc.log.read_text()[-3000:]}")
            return " ready." in proc.log.read_text(errors="replace")

        wait_for(ready, timeout, what=f"celery worker {index}")

    def airflow(self, *args: str, timeout: float = 120) -> str:
        out = subprocess.run(
            [os.path.join(BIN, "airflow"), *args], env=self.airflow_env(), capture_output=True, text=True, timeout=timeout, cwd=self.root
        )
        if out.returncode:
            raise RuntimeError(f"airflow {' '.join(args)} failed ({out.returncode}): {out.stderr[-3000:]}")
        return out.stdout

    def start_component(self, component: str) -> Proc:
        if not self.api_port:
            self.api_port = free_port()
            (self.home / "simple_auth_manager_passwords.json.generated").write_text(json.dumps({"admin": ADMIN_PASSWORD}))
        args = [component]
        if component == "api-server":
            args += ["--host", "127.0.0.1", "--port", str(self.api_port), "--workers", "1"]
        return self._spawn(component, [os.path.join(BIN, "airflow"), *args], self.airflow_env())

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> Proc:
        old = self.procs.get(name)
        if old is not None:
            self.old_pgids.append(old.pgid)
        self.logs.mkdir(parents=True, exist_ok=True)
        count = sum(1 for p in self.logs.glob(f"{name}*.log"))
        log = self.logs / f"{name}{'-' + str(count) if count else ''}.log"
        handle = open(log, "wb")
        popen = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True)
        proc = Proc(name, popen, log, pgid=popen.pid)
        self.procs[name] = proc
        return proc

    def wait_healthy(self, timeout: float = 180) -> None:
        def healthy():
            for name, proc in self.procs.items():
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.popen.returncode}); log tail:\n{proc.log.read_text()[-3000:]}")
            try:
                body = httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return False
            parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
            return all((body.get(p) or {}).get("status") == "healthy" for p in parts)

        wait_for(healthy, timeout, what="healthy Airflow components")

    def stale_transactions(self) -> list[dict[str, Any]]:
        """Sessions of this deployment's database idle inside a transaction, with the local
        process that holds their socket (pid and command line), if any."""

        conn = _pg_connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pid, client_port, now() - state_change FROM pg_stat_activity "
                            "WHERE datname = %s AND state = 'idle in transaction'", (self.db_name,))
                rows = cur.fetchall()
        finally:
            conn.close()
        holders: dict[int, list[int]] = {}
        for proc in psutil.process_iter(["pid"]):
            try:
                for sock in proc.net_connections(kind="tcp"):
                    if sock.raddr and sock.raddr.port == 5432:
                        holders.setdefault(sock.laddr.port, []).append(proc.info["pid"])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found = []
        for backend, port, idle in rows:
            pids = holders.get(port, [])
            commands = []
            for pid in pids:
                try:
                    commands.append(" ".join(psutil.Process(pid).cmdline())[:120])
                except psutil.NoSuchProcess:
                    pass
            found.append({"backend": backend, "idle_s": idle.total_seconds(), "holder_pids": pids, "holders": commands})
        return found

    def wait_new_scheduler(self, since: float, timeout: float = 120) -> None:
        """Wait until a scheduler heartbeat newer than ``since`` (epoch seconds) is recorded."""
        from datetime import datetime

        def beat():
            body = httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=5).json()
            latest = (body.get("scheduler") or {}).get("latest_scheduler_heartbeat")
            return latest and datetime.fromisoformat(latest).timestamp() > since

        wait_for(beat, timeout, what="the new scheduler's first heartbeat")

    # -- faults ------------------------------------------------------------------------
    def kill_component(self, name: str, sig: int = signal.SIGKILL, *, whole_group: bool = True, descendants: bool = False) -> int:
        """Kill a component as a crashed host or container would: with ``whole_group`` its forked
        workers die too (a LocalExecutor worker that outlives its scheduler keeps the
        scheduler's Postgres connection, and its open transaction's row locks, alive: the next
        scheduler would then skip that DAG run); with ``descendants`` also every process it
        started in a group of its own (task processes: the supervisor gives each its own group)."""

        proc = self.procs[name]
        victims = []
        if descendants:
            try:
                victims = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        if whole_group:
            os.killpg(proc.pgid, sig)
        else:
            os.kill(proc.pid, sig)
        for victim in victims:
            try:
                victim.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        proc.popen.wait(timeout=30)
        return proc.pid

    def airflow_pgids(self) -> list[int]:
        """The process groups of the Airflow components (not the Ray head's)."""
        return [p.pgid for p in self.procs.values() if p.name != "ray-head"]

    # -- stop --------------------------------------------------------------------------
    def stop(self) -> None:
        groups = [p.pgid for p in self.procs.values() if p.name != "ray-head"] + self.old_pgids
        _stop_groups(groups)
        if self.ray_pgid:
            _stop_groups([self.ray_pgid])
        for proc in self.procs.values():
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.drop_database()
        ray_temp = self.root / "ray_temp_dir"
        if ray_temp.exists():
            shutil.rmtree(ray_temp.read_text(), ignore_errors=True)


def _stop_groups(pgids: list[int], grace: float = 10.0) -> None:
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_group_alive(g) for g in pgids):
        time.sleep(0.2)
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_group_alive(g) for g in pgids):
        time.sleep(0.1)


def _up_or_exited(proc: Proc, address_file: Path) -> bool:
    """A Ray head is up once it wrote its address file; one that exited will never be."""
    return bool(address_file.exists() and address_file.read_text().strip()) or proc.popen.poll() is not None


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. A member that exited but that this process
    has not reaped yet (a zombie: the group leader we started) does not count, or every stop
    would wait out its whole grace period."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.info["pid"]) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _secret(root: Path, name: str) -> str:
    path = root / f".{name}_secret"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
    return path.read_text()


def _fernet_key(root: Path) -> str:
    path = root / ".fernet_key"
    if not path.exists():
        from cryptography.fernet import Fernet

        path.write_text(Fernet.generate_key().decode())
    return path.read_text()


def task_pid(ti_id: str) -> int | None:
    """PID of the task runner process of a task instance (its title is ``airflow worker -- <ti id>``)."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if cmdline.strip() == f"airflow worker -- {ti_id}":
            return proc.info["pid"]
    return None


def ray_loaded(pgids: list[int]) -> list[str]:
    """The processes of these process groups, other than task runners (``airflow worker --
    <ti id>``, which run shards) and the triggerer's Ray clients (``core.ray.driver``, started
    by fork and exec), that have Ray's core library (``_raylet``)
    mapped: a process that forks others (the scheduler and its LocalExecutor workers, Celery's
    prefork pool, the triggerer, the DAG processor) must not, or Ray aborts in forked children
    while they connect (``plasma_store_provider.cc: Check failed: WarmupStore()``)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(proc.info["pid"]) not in pgids:
                continue
            cmdline = " ".join(proc.info.get("cmdline") or [])
            if cmdline.startswith("airflow worker -- ") or "airflow_batch_provider.core.ray.driver" in cmdline:
                continue
            with open(f"/proc/{proc.info['pid']}/maps") as maps:
                if "_raylet" in maps.read():
                    found.append(f"{proc.info['pid']}: {cmdline[:160]}")
        except (OSError, psutil.NoSuchProcess):
            continue
    return found


class AirflowClient:
    """The REST API v2, as the UI uses it."""

    def __init__(self, base_url: str, username: str = "admin", password: str = ADMIN_PASSWORD):
        self.http = httpx.Client(base_url=base_url, timeout=30)
        token = self.http.post("/auth/token", json={"username": username, "password": password})
        token.raise_for_status()
        self.http.headers["Authorization"] = f"Bearer {token.json()['access_token']}"

    def _ok(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            raise AssertionError(f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text[:2000]}")
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self._ok(self.http.get(path, params=params))

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._ok(self.http.post(path, json=body))

    def patch(self, path: str, body: dict[str, Any]) -> Any:
        return self._ok(self.http.patch(path, json=body))

    # -- helpers -------------------------------------------------------------------------
    def wait_dag(self, dag_id: str, timeout: float = 180) -> dict[str, Any]:
        def parsed():
            response = self.http.get(f"/api/v2/dags/{dag_id}")
            if response.status_code == 200:
                return response.json()
            errors = self.get("/api/v2/importErrors").get("import_errors", [])
            if errors:
                raise AssertionError(f"DAG import errors: {errors}")
            return None

        return wait_for(parsed, timeout, what=f"DAG {dag_id} to be parsed")

    def unpause(self, dag_id: str) -> None:
        self.patch(f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        body = self.post(f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
        return body["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]

    def wait_run(self, dag_id: str, run_id: str, states=TERMINAL, timeout: float = 300, on_poll=None) -> str:
        def done():
            if on_poll:
                on_poll()
            state = self.run_state(dag_id, run_id)
            return state if state in states else None

        try:
            return wait_for(done, timeout, interval=0.5, what=f"run {run_id} of {dag_id} to reach {sorted(states)}")
        except TimeoutError as err:
            tis = [(t["task_id"], t["map_index"], t["state"], t["try_number"]) for t in self.task_instances(dag_id, run_id)]
            raise TimeoutError(f"{err}; task instances: {tis}") from None

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=1000)["task_instances"]

    def shard_tis(self, dag_id: str, run_id: str, task_id: str) -> list[dict[str, Any]]:
        return sorted((t for t in self.task_instances(dag_id, run_id) if t["task_id"] == task_id), key=lambda t: t["map_index"])

    def tries(self, dag_id: str, run_id: str, task_id: str, map_index: int) -> list[dict[str, Any]]:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/tries"
        return self.get(path)["task_instances"]

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1, key: str = "return_value") -> Any:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
        return self.get(path, map_index=map_index, deserialize=True)["value"]

    def log_text(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}"
        body = self.get(path, map_index=map_index, full_content=True)
        content = body.get("content")
        return content if isinstance(content, str) else "\n".join(json.dumps(c) if not isinstance(c, str) else c for c in content or [])

    def clear_run(self, dag_id: str, run_id: str) -> Any:
        """Clear every task of the run, as "Clear" on a DAG run in the UI does."""
        body = {"dry_run": False, "dag_run_id": run_id, "only_failed": False, "reset_dag_runs": True}
        return self.post(f"/api/v2/dags/{dag_id}/clearTaskInstances", body)

    def clear_failed(self, dag_id: str, run_id: str, task_ids: list[Any]) -> Any:
        body = {
            "dry_run": False,
            "dag_run_id": run_id,
            "only_failed": True,
            "include_downstream": True,
            "task_ids": task_ids,
        }
        return self.post(f"/api/v2/dags/{dag_id}/clearTaskInstances", body)


# -- the scenarios' deployments ---------------------------------------------------------------
HERE = Path(__file__).parent
#: figures of each deployment and scenario, for the report at the end of the session
TIMINGS: dict[str, Any] = {}
#: where the report is written too (one file per deployment)
TIMING_FILES: list[Path] = []


@contextlib.contextmanager
def running_deployment(prefix: str, dags: dict[str, dict[str, Any]], *, dag_files: tuple[str, ...] = (), **options: Any):
    """A started :class:`Deployment` (``options``: executor, Celery workers...) running ``dags``,
    and the DAG files ``dag_files`` (names beside this module) as they are."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    dep = Deployment(root, **options)
    data = root / "data"
    configs = []
    for dag_id, opts in dags.items():
        base = data / dag_id
        write_jsonl(str(base / "in" / "rows.jsonl"), [{"id": i, "value": i} for i in range(opts["rows"])])
        kwargs: dict[str, Any] = {"sleep_s": opts["sleep_s"], "calls_log": str(base / "calls.log")}
        if opts.get("fail_mod"):
            kwargs.update(fail_marker=str(base / "FAIL"), fail_mod=opts["fail_mod"])
        configs.append(
            {
                "dag_id": dag_id,
                "source": str(base / "in" / "*.jsonl"),
                "sink": str(base / "out"),
                "predictor_kwargs": kwargs,
                **{k: v for k, v in opts.items() if k not in ("rows", "sleep_s", "fail_mod")},
            }
        )
    dep.dags.mkdir(parents=True, exist_ok=True)
    (dep.dags / "deploy_dags.json").write_text(json.dumps(configs, indent=1))
    shutil.copy(HERE / "dag_template.py", dep.dags / "deploy_dags.py")
    for name in dag_files:
        shutil.copy(HERE / name, dep.dags / name)
    TIMING_FILES.append(root / "timings.json")
    try:
        dep.start()
        TIMINGS[f"startup ({dep.executor})"] = {k: round(v, 1) for k, v in dep.timings.items()}
        yield dep
    finally:
        dep.stop()
        (root / "timings.json").write_text(json.dumps(TIMINGS, indent=1))  # the root (logs, data) is kept for inspection


# -- a scenario's run, and the evidence it leaves -------------------------------------------
SHARD = "batch.shard"
PLAN = "batch.plan"
FINALIZE = "batch.finalize"


def calls(calls_log: Path) -> collections.Counter:
    """How often the predictor computed each id (its ``calls_log``)."""
    return collections.Counter(logged_ids(calls_log))


def committed(sink: Path) -> set[str]:
    return {p.stem for p in (sink / "_checkpoint" / "shards").glob("*.json")}


def unit_ids(client: AirflowClient, dag_id: str, run_id: str) -> dict[int, dict[str, Any]]:
    """map index -> {"shard_ids", "ids"} from the plan task's output (the mapped list)."""
    units = client.xcom(dag_id, run_id, PLAN)
    out = {}
    for index, unit in enumerate(units):
        ids = [i for s in unit["shards"] for i in range(s["start"], s["end"])]
        out[index] = {"shard_ids": [s["shard_id"] for s in unit["shards"]], "ids": ids}
    return out


def max_overlap(tis: list[dict[str, Any]]) -> int:
    from datetime import datetime

    events = []
    for ti in tis:
        if ti.get("start_date") and ti.get("end_date"):
            events.append((datetime.fromisoformat(ti["start_date"]), 1))
            events.append((datetime.fromisoformat(ti["end_date"]), -1))
    level = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        level += delta
        peak = max(peak, level)
    return peak


def assert_each_row_once(sink: Path, rows: int) -> None:
    ids = sink_ids(sink)
    dupes = [i for i, n in collections.Counter(ids).items() if n > 1]
    assert not dupes, f"rows written more than once: {dupes[:10]}"
    assert sorted(ids) == list(range(rows))
    assert (sink / "_SUCCESS").exists()


def start_run(client: AirflowClient, dag_id: str) -> str:
    client.unpause(dag_id)
    return client.trigger(dag_id)


def retry_outcome(log: str) -> str:
    """What a retried shard task did, from its log (ResumableJobMixin / deferrable path messages)."""
    if "Reconnecting to existing job" in log or "Reconnected to running Ray work" in log or "Reconnecting to running Ray work" in log:
        return "reconnected"
    if "already completed successfully" in log or "already finished; not submitting again" in log:
        return "already finished"
    return "recomputed"


def kill_only_the_scheduler(deployment: Deployment, client: AirflowClient, scenario) -> None:
    """Run the scenario's DAG, SIGKILL the scheduler process alone once a shard is committed and
    another runs, start a new one 2 s later; the run must succeed with every row once and no
    committed shard computed again. Records the figures and any stale DB transactions."""
    started = time.monotonic()
    run_id = start_run(client, scenario.dag_id)

    def one_committed_one_running():
        tis = client.shard_tis(scenario.dag_id, run_id, SHARD)
        return committed(scenario.sink) and any(t["state"] == "running" for t in tis)

    wait_for(one_committed_one_running, 240, interval=0.2, what="a committed shard and a running one")
    done_before, calls_before = committed(scenario.sink), calls(scenario.calls_log)
    def celery_workers_alive() -> list[str]:
        return [name for name, proc in deployment.procs.items() if name.startswith("celery-") and proc.popen.poll() is None]

    workers_before = celery_workers_alive()
    killed_at = time.monotonic()
    deployment.kill_component("scheduler", signal.SIGKILL, whole_group=False)
    assert celery_workers_alive() == workers_before  # only the scheduler died
    scenario.timings["celery_workers_alive"] = workers_before
    time.sleep(2)
    scenario.timings["stale_transactions_after_kill"] = deployment.stale_transactions()
    restarted_at = time.time()
    deployment.start_component("scheduler")
    deployment.wait_new_scheduler(restarted_at)
    assert client.wait_run(scenario.dag_id, run_id, timeout=400) == "success"
    scenario.timings["kill_to_success_s"] = round(time.monotonic() - killed_at, 1)
    scenario.timings["run_s"] = round(time.monotonic() - started, 1)

    after = calls(scenario.calls_log)
    plan = unit_ids(client, scenario.dag_id, run_id)
    for unit in plan.values():
        if set(unit["shard_ids"]) <= done_before:
            assert all(after[i] == calls_before[i] for i in unit["ids"]), f"committed shard {unit['shard_ids']} computed again"
    assert_each_row_once(scenario.sink, scenario.opts["rows"])
    ids = sink_ids(scenario.sink)
    scenario.timings.update(rows_lost=scenario.opts["rows"] - len(set(ids)), rows_duplicated=len(ids) - len(set(ids)),
                            rows_recomputed=sum(n - 1 for n in after.values() if n > 1))
