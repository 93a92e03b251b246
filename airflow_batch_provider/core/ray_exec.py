"""Run shards on Ray, on long-lived workers that load the model once.

Every Airflow shard task is a separate Ray driver (job), and Ray's task workers do not
outlive their job, so a model cached in a task worker would be loaded again for every
shard. Instead shards run on *detached named actors* (``ShardWorker``), one per model
replica, keyed by what they load (predictor, kwargs, resources). A shard task leases an idle
replica, calls it, and leaves it warm for the next shard, in this DAG run or the next.
Replicas exit on their own after ``idle_timeout_s`` without work, freeing their GPUs.

A shard task that finds every replica busy waits *on* a replica (``reserve`` with a wait)
rather than polling it, so it gets the replica the moment the running shard ends: with
more shard tasks allowed than replicas (``max_active_shards``), the next shard starts on a
warm replica without waiting for Airflow to schedule its task.

Ray covers a dying worker: the actor is restarted (``max_restarts``) and the call retried
(``max_task_retries``) with the spec's ``max_retries``. A retried Airflow task reconnects to
a call still running by its attempt token (``status`` / ``wait``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import ray

from airflow_batch_provider.core.planning import Shard
from airflow_batch_provider.core.spec import BatchSpec

log = logging.getLogger(__name__)

NAMESPACE = "airflow_batch_provider"
DEFAULT_IDLE_TIMEOUT_S = 600.0
LEASE_TIMEOUT_S = 120.0
#: longest one ``reserve`` call waits on a busy replica before the client looks at the others.
LEASE_WAIT_S = 2.0
_RESULTS_KEPT = 256


@ray.remote(concurrency_groups={"compute": 1, "control": 8, "lease": 64})
class ShardWorker:
    """A model replica: one predictor instance, one shard at a time, control calls alongside.

    ``reserve`` calls, which may block while they wait for the replica, have a thread group of
    their own ("lease"), so that waiting shard tasks never hold up ``status`` or ``wait``."""

    def __init__(self, predictor: str, predictor_kwargs: dict[str, Any], idle_timeout_s: float):
        from airflow_batch_provider.core.allocator import keep_freed_memory
        from airflow_batch_provider.core.predictors import build_predictor

        # Before the model loads: this process serves only this replica, shard after shard.
        self.keeps_freed_memory = keep_freed_memory()
        started = time.perf_counter()
        self.predictor = build_predictor(predictor, predictor_kwargs)
        self.load_seconds = time.perf_counter() - started
        self.shards_run = 0
        self._lock = threading.Lock()
        self._lease: tuple[str, float] | None = None
        self._running: str | None = None
        self._running_attempt: dict[str, Any] = {}
        self._results: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._done = threading.Condition(self._lock)
        self._last_active = time.monotonic()
        self._idle_timeout_s = idle_timeout_s
        threading.Thread(target=self._reap_when_idle, name="abp-idle-reaper", daemon=True).start()

    # -- compute ----------------------------------------------------------------------
    @ray.method(concurrency_group="compute")
    def run_shards(
        self, spec: dict[str, Any], storage_options: dict[str, Any] | None, shards: list[dict[str, Any]], attempt: dict[str, Any]
    ) -> list[dict[str, Any]]:
        from airflow_batch_provider.core.runner import ShardRunner

        token = attempt["token"]
        with self._lock:
            self._running, self._lease, self._running_attempt = token, None, attempt
            self._last_active = time.monotonic()
        try:
            runner = ShardRunner(BatchSpec.from_dict(spec), storage_options, predictor=self.predictor)
            results = []
            for shard in shards:
                result = runner.run(Shard.from_dict(shard), attempt).to_dict()
                result["worker_pid"] = os.getpid()
                result["model_load_seconds"] = self.load_seconds if self.shards_run == 0 else 0.0
                self.shards_run += 1
                results.append(result)
            self._finish(token, {"state": "SUCCEEDED", "results": results})
            return results
        except BaseException as err:
            self._finish(token, {"state": "FAILED", "error": f"{type(err).__name__}: {err}"})
            raise

    def _finish(self, token: str, outcome: dict[str, Any]) -> None:
        with self._lock:
            self._results[token] = outcome
            while len(self._results) > _RESULTS_KEPT:
                self._results.popitem(last=False)
            self._running, self._running_attempt = None, {}
            self._last_active = time.monotonic()
            self._done.notify_all()

    # -- control (answered while a shard computes) ------------------------------------
    @ray.method(concurrency_group="lease")
    def reserve(self, token: str, wait_s: float = 0.0) -> bool:
        """Lease this replica to one shard task; False while another holds or uses it.

        With ``wait_s`` > 0 a busy replica answers as soon as it is free (its shard ended, or
        the lease holding it was released or expired), or False after ``wait_s``."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while True:
                now = time.monotonic()
                lease_free = self._lease is None or now - self._lease[1] > LEASE_TIMEOUT_S or self._lease[0] == token
                if self._running is None and lease_free:
                    self._lease = (token, now)
                    self._last_active = now
                    return True
                wake = deadline - now
                if wake <= 0:
                    return False
                if self._running is None and self._lease is not None:  # held by a lease: it may expire first
                    wake = min(wake, self._lease[1] + LEASE_TIMEOUT_S - now + 0.01)
                self._done.wait(timeout=wake)

    @ray.method(concurrency_group="control")
    def release(self, token: str) -> None:
        with self._lock:
            if self._lease and self._lease[0] == token:
                self._lease = None
                self._done.notify_all()

    @ray.method(concurrency_group="control")
    def status(self, token: str) -> dict[str, Any]:
        with self._lock:
            return self._state_of(token)

    @ray.method(concurrency_group="control")
    def wait(self, token: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._state_of(token)["state"] == "RUNNING" and time.monotonic() < deadline:
                self._done.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            return self._state_of(token)

    def _state_of(self, token: str) -> dict[str, Any]:
        """RUNNING also covers a call leased to ``token`` that has not started yet: Ray runs
        control calls on their own threads, so ``status`` can be answered before the
        ``run_shards`` call it follows is picked up (on a busy machine, for a while); reporting
        that as UNKNOWN would fail the shard task. A lease whose call never came expires."""
        if self._running == token:
            return {"state": "RUNNING"}
        if token in self._results:
            return self._results[token]
        if self._lease is not None and self._lease[0] == token and time.monotonic() - self._lease[1] <= LEASE_TIMEOUT_S:
            return {"state": "RUNNING", "queued": True}
        return {"state": "UNKNOWN"}

    @ray.method(concurrency_group="control")
    def running_for(self, task_key: dict[str, Any]) -> str | None:
        """The token of the call running now for this task (``task_key``: the attempt's fields
        that every try of one Airflow task instance shares), or None."""
        with self._lock:
            attempt = self._running_attempt
            if attempt and all(attempt.get(k) == v for k, v in task_key.items()):
                return attempt["token"]
            return None

    @ray.method(concurrency_group="control")
    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "load_seconds": self.load_seconds, "shards_run": self.shards_run,
                "keeps_freed_memory": self.keeps_freed_memory}

    def _reap_when_idle(self) -> None:
        while True:
            time.sleep(min(10.0, self._idle_timeout_s / 4))
            with self._lock:
                idle = self._running is None and time.monotonic() - self._last_active > self._idle_timeout_s
            if idle:
                log.info("ShardWorker idle for %.0f s: exiting to free its resources", self._idle_timeout_s)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return


# -- client side (the Airflow task) ----------------------------------------------------------
@dataclass(frozen=True)
class RayTarget:
    """How to reach Ray: address (None: RAY_ADDRESS or a local Ray) and auth token."""

    address: str | None = None
    token: str | None = None


def connect(target: RayTarget | None = None) -> None:
    """``ray.init`` once per process; later calls reuse the connection."""
    if ray.is_initialized():
        return
    target = target or RayTarget()
    if target.token:
        _use_token(target.token)
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "logging_level": logging.WARNING, "log_to_driver": True}
    if target.address:
        kwargs["address"] = target.address
    ray.init(**kwargs)
    log.info("Connected to Ray at %s", target.address or os.environ.get("RAY_ADDRESS") or "a new local Ray")


def _use_token(token: str) -> None:
    """Make this process's Ray client send ``token``.

    Setting ``RAY_AUTH_TOKEN`` is not enough once Ray is imported: the client sends a token
    only in token mode (``RAY_AUTH_MODE=token``), and Ray caches both the mode and the token
    (else read from ``~/.ray/auth_token``, possibly another cluster's) in C++, so both
    caches are refreshed here.
    """
    os.environ["RAY_AUTH_TOKEN"] = token  # read by Ray's client; never logged
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token auth: the environment is all there is
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def worker_key(spec: BatchSpec) -> str:
    """Replicas are shared by every job that loads the same model with the same resources."""
    raw = json.dumps([spec.predictor, spec.predictor_kwargs, spec.num_gpus, spec.num_cpus], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def pool_size(spec: BatchSpec) -> int:
    """Replicas at most: what the cluster's resources fit (or ``spec.num_workers``)."""
    if spec.num_workers:
        return spec.num_workers
    total = ray.cluster_resources()
    fits = []
    if spec.num_gpus:
        fits.append(int(total.get("GPU", 0) // spec.num_gpus))
    if spec.num_cpus:
        fits.append(int(total.get("CPU", 0) // spec.num_cpus))
    return max(1, min(fits) if fits else 1)


def worker_name(spec: BatchSpec, slot: int) -> str:
    return f"abp-{worker_key(spec)}-{slot}"


def get_worker(spec: BatchSpec, slot: int, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S):
    name = worker_name(spec, slot)
    options: dict[str, Any] = {
        "name": name,
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "get_if_exists": True,
        "num_cpus": spec.num_cpus,
        "num_gpus": spec.num_gpus,
        "max_restarts": spec.max_retries,
        "max_task_retries": spec.max_retries,
    }
    # No runtime_env: Ray sets OMP_NUM_THREADS from num_cpus itself, and a runtime_env would
    # keep the replica off Ray's pre-started worker processes (a new process per replica).
    return name, ShardWorker.options(**options).remote(spec.predictor, spec.predictor_kwargs, idle_timeout_s)


def start_workers(spec: BatchSpec, wanted: int) -> list[str]:
    """Create up to ``wanted`` replicas (at most :func:`pool_size`) without waiting for them.

    Called by the plan step: the models load on Ray while Airflow schedules the shard tasks,
    which then lease warm replicas. Replicas that already exist are left as they are.
    """
    count = min(pool_size(spec), wanted)
    return [get_worker(spec, slot)[0] for slot in range(count)]


def lease_worker(spec: BatchSpec, token: str, *, wait_s: float = LEASE_WAIT_S):
    """An idle replica reserved for ``token``; creates replicas up to :func:`pool_size`.

    When all are busy, it waits on one replica at a time (``wait_s`` each, taking turns from
    a slot that depends on ``token``, so that waiting tasks spread over the replicas) and
    looks at all of them again between waits; a replica that frees up is taken at once.
    """
    size = pool_size(spec)
    first = int(hashlib.sha256(token.encode()).hexdigest()[:8], 16) % size
    for turn in itertools.count():
        for slot in range(size):
            name, handle = get_worker(spec, slot)
            if ray.get(handle.reserve.remote(token)):
                return name, handle
        if turn == 0:
            log.info("All %d Ray workers for this model are busy; waiting for one", size)
        name, handle = get_worker(spec, (first + turn) % size)
        if ray.get(handle.reserve.remote(token, wait_s)):
            return name, handle


def find_worker(name: str):
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def work_status(worker: str, token: str, timeout: float | None = None) -> dict[str, Any]:
    """How the call ``token`` on replica ``worker`` is doing: ``ShardWorker.status``'s answer
    (``state`` RUNNING, SUCCEEDED with ``results``, FAILED with ``error``, or UNKNOWN), or
    ``{"state": "LOST"}`` when the replica is gone."""
    handle = find_worker(worker)
    if handle is None:
        return {"state": "LOST"}
    return ray.get(handle.status.remote(token), timeout=timeout)


def find_running_work(spec: BatchSpec, task_key: dict[str, Any], timeout_s: float = 2.0) -> dict[str, str] | None:
    """``{"worker", "token"}`` of a call that an earlier try of the same task left running, or None.

    A retry normally finds its earlier try's call in ``task_state_store``; this covers a try that
    died (or was reset by the scheduler) after submitting but before that id was stored. Only
    replicas that exist are asked, and one still loading its model (it runs nothing yet) is not
    waited for beyond ``timeout_s``.
    """
    asked = {}
    for slot in range(pool_size(spec)):
        handle = find_worker(worker_name(spec, slot))
        if handle is not None:
            asked[handle.running_for.remote(task_key)] = worker_name(spec, slot)
    if not asked:
        return None
    ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=timeout_s)
    for ref in ready:
        try:
            token = ray.get(ref)
        except ray.exceptions.RayActorError:  # a replica that died or restarts runs nothing of ours
            continue
        if token:
            return {"worker": asked[ref], "token": token}
    return None


def submit(spec: BatchSpec, shards: list[Shard], attempt: dict[str, Any], storage_options: dict[str, Any] | None = None):
    """Lease a replica and start the shards on it; returns (worker name, ObjectRef)."""
    name, handle = lease_worker(spec, attempt["token"])
    ref = handle.run_shards.remote(spec.to_dict(), storage_options, [s.to_dict() for s in shards], attempt)
    return name, ref


def kill_workers(spec: BatchSpec) -> int:
    """Stop this model's replicas now (instead of waiting for their idle timeout)."""
    killed = 0
    for slot in range(pool_size(spec)):
        handle = find_worker(worker_name(spec, slot))
        if handle is not None:
            ray.kill(handle, no_restart=True)
            killed += 1
    return killed
