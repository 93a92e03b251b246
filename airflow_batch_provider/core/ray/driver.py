"""A Ray client in a child process, one per cluster: how one process talks to several clusters.

``ray.init`` connects a process to one cluster for its lifetime, but Airflow's triggerer runs
the triggers of every DAG in one process, and two shard tasks may use two ``ray``
connections (two clusters). So the triggerer does not connect itself: for each target
(address and token) it starts one child process (:class:`RayDriver`) that connects to that
cluster and answers :class:`~airflow_batch_provider.core.ray.pool.ReplicaPool` calls sent as
JSON lines on its stdin. The token reaches the child on its stdin, never in its command line
or environment. Calls from many threads share one child and run side by side in it; a child
that died is started again on the next call, and one whose Ray Client (``ray://``) connection
was lost connects again and answers the call (``connection.reconnect``).

A target without an address means "``RAY_ADDRESS``, else the Ray this process runs" (as does
``RAY_ADDRESS=local``): the parent resolves it, because a child would otherwise start a Ray of its own that holds none of
the task's replicas. When this process is itself connected to that Ray (``airflow dags test``
runs triggers inline, next to its tasks' local Ray), calls run here, without a child.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from airflow_batch_provider.core.errors import RayWorkError
from airflow_batch_provider.core.ray.connection import RayTarget
from airflow_batch_provider.core.tunables import DRIVER_CALL_S

log = logging.getLogger(__name__)

#: the pool methods a driver serves (reading, and stopping a call): nothing that writes to the sink.
METHODS = ("status", "cancel")


class RayDriver:
    """A child process connected to one Ray cluster, serving pool calls for this process."""

    _lock = threading.Lock()
    _drivers: dict[str, RayDriver] = {}

    @classmethod
    def for_target(cls, target: RayTarget) -> RayDriver | InProcessDriver:
        """The driver of ``target`` in this process (started on first use, or after it died)."""
        address = target.address or os.environ.get("RAY_ADDRESS") or None
        if address == "local":  # "start a Ray of your own": a child's own Ray holds none of the replicas
            address = None
        if _connected_to(address):
            return InProcessDriver()
        if address is None:
            raise RayWorkError(
                "no Ray address to follow the shard's Ray work from: this process is not connected to Ray and neither the "
                "`ray_batch` connection's host nor RAY_ADDRESS names a cluster. A deferred shard task needs a Ray cluster that "
                "its worker and the triggerer both reach: set the connection's host (or RAY_ADDRESS) to it"
            )
        target = RayTarget(address=address, token=target.token or os.environ.get("RAY_AUTH_TOKEN") or None)
        key = hashlib.sha256(json.dumps([target.address, target.token]).encode()).hexdigest()
        with cls._lock:
            driver = cls._drivers.get(key)
            if driver is None or not driver.alive:
                driver = cls._drivers[key] = cls(target)
            return driver

    @classmethod
    def stop_all(cls) -> None:
        with cls._lock:
            drivers, cls._drivers = list(cls._drivers.values()), {}
        for driver in drivers:
            driver.stop()

    def __init__(self, target: RayTarget):
        self.address = target.address
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "airflow_batch_provider.core.ray.driver"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
        )
        self._write_lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count()
        self._send({"address": target.address, "token": target.token})
        threading.Thread(target=self._read_replies, name="abp-ray-driver-reader", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def call(self, method: str, spec: dict[str, Any], timeout: float = DRIVER_CALL_S, **args: Any) -> Any:
        """``ReplicaPool(spec).<method>(**args)`` in the child; raises :class:`RayWorkError` when
        it failed there or the child died."""
        if method not in METHODS:
            raise ValueError(f"a Ray driver serves {METHODS}, not {method!r}")
        future: Future = Future()
        request_id = next(self._ids)
        self._pending[request_id] = future
        try:
            self._send({"id": request_id, "method": method, "spec": spec, "args": args})
        except OSError as err:
            self._pending.pop(request_id, None)
            raise RayWorkError(f"the Ray client process for {self.address} is gone ({err}); the next call starts a new one") from None
        return future.result(timeout=timeout)

    def stop(self) -> None:
        if self.alive:
            self._proc.stdin.close()  # the child exits at end of input
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()

    def _send(self, message: dict[str, Any]) -> None:
        with self._write_lock:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()

    def _read_replies(self) -> None:
        for line in self._proc.stdout:
            try:
                reply = json.loads(line)
            except ValueError:
                continue  # not ours (a library printing to stdout)
            future = self._pending.pop(reply.get("id"), None)
            if future is None:
                continue
            if "error" in reply:
                future.set_exception(RayWorkError(reply["error"]))
            else:
                future.set_result(reply.get("result"))
        gone = RayWorkError(f"the Ray client process for {self.address} exited (code {self._proc.wait()})")
        for future in list(self._pending.values()):
            future.set_exception(gone)
        self._pending.clear()


class InProcessDriver:
    """The same calls as :class:`RayDriver`, answered by this process's own Ray connection."""

    alive = True

    def call(self, method: str, spec: dict[str, Any], timeout: float = DRIVER_CALL_S, **args: Any) -> Any:
        from airflow_batch_provider.core.ray.pool import ReplicaPool
        from airflow_batch_provider.core.spec import JobSpec

        if method not in METHODS:
            raise ValueError(f"a Ray driver serves {METHODS}, not {method!r}")
        try:
            return getattr(ReplicaPool(JobSpec.from_dict(spec)), method)(**args)
        except Exception as err:
            raise RayWorkError(f"{type(err).__name__}: {err}") from None

    def stop(self) -> None:
        pass


def _connected_to(address: str | None) -> bool:
    """Whether this process is connected to Ray, and to the cluster at ``address`` (None or
    ``auto``: whichever it is connected to)."""
    ray = sys.modules.get("ray")  # a process that never imported Ray is not connected
    if ray is None or not ray.is_initialized():
        return False
    if address in (None, "auto"):
        return True
    from airflow_batch_provider.core.ray import connection

    if address.startswith(connection.RAY_CLIENT_SCHEME):  # Ray Client: the GCS address is the cluster's, not this one
        return address == connection.connected_address()
    current = ray.get_runtime_context().gcs_address
    return address.split("/")[0] == current


def _serve() -> None:
    """The child: connect, then answer each request line in a thread of its own."""
    from airflow_batch_provider.core.ray import connection
    from airflow_batch_provider.core.ray.connection import connect
    from airflow_batch_provider.core.ray.pool import ReplicaPool
    from airflow_batch_provider.core.spec import JobSpec

    out = sys.stdout
    sys.stdout = sys.stderr  # Ray and predictors print: only replies go to the parent
    first = json.loads(sys.stdin.readline())
    write_lock = threading.Lock()

    def reply(message: dict[str, Any]) -> None:
        with write_lock:
            out.write(json.dumps(message, default=str) + "\n")
            out.flush()

    try:
        connect(RayTarget(address=first.get("address"), token=first.get("token")))
        failure = None
    except Exception as err:  # every call answers with it: the trigger reports it
        failure = f"cannot connect to Ray at {first.get('address')}: {type(err).__name__}: {err}"

    def handle(request: dict[str, Any]) -> None:
        try:
            if failure:
                raise RayWorkError(failure)
            if request["method"] not in METHODS:
                raise ValueError(f"unknown method {request['method']!r}")
            pool = ReplicaPool(JobSpec.from_dict(request["spec"]))
            session = connection.session()
            try:
                result = getattr(pool, request["method"])(**request["args"])
            except Exception as err:  # Ray Client lost past its grace period: connect again, ask again
                if not connection.is_lost_connection(err):
                    raise
                connection.reconnect(session, err)
                result = getattr(ReplicaPool(JobSpec.from_dict(request["spec"])), request["method"])(**request["args"])
            reply({"id": request["id"], "result": result})
        except Exception as err:
            reply({"id": request["id"], "error": f"{type(err).__name__}: {err}"})

    with ThreadPoolExecutor(max_workers=16) as workers:
        for line in sys.stdin:
            if line.strip():
                workers.submit(handle, json.loads(line))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _serve()
