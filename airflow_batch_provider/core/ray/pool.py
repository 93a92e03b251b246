"""The client side of the model replicas: one ``ReplicaPool`` per model.

A pool is the set of detached ``Replica`` actors that load one model with one set of
resources (predictor, kwargs, GPUs, CPUs), named ``abp-{key}-{slot}``; every job and task that
runs the same model shares them. A caller leases an idle replica, starts its shards on it,
and follows the call by its work id ``{"worker": name, "token": attempt token}``, which is
plain JSON so that it can be kept in Airflow's ``task_state_store`` and a trigger's kwargs.

A caller that finds every replica busy waits *on* a replica (``reserve`` with a wait) rather
than polling it, so it gets the replica the moment the running shard ends: with more shard
tasks allowed than replicas, the next shard starts on a warm replica without waiting for
Airflow to schedule its task.

Ray covers a dying replica process: the actor is restarted (``max_restarts``) and the call
retried (``max_task_retries``) with the spec's ``max_retries``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from typing import Any, Callable

import ray

from airflow_batch_provider.core.domain.planning import Shard
from airflow_batch_provider.core.errors import BatchError, RayWorkError
from airflow_batch_provider.core.ray.connection import NAMESPACE
from airflow_batch_provider.core.ray.replica import DEFAULT_IDLE_TIMEOUT_S, Replica
from airflow_batch_provider.core.ray.states import Progress, RunState
from airflow_batch_provider.core.spec import BatchSpec

log = logging.getLogger(__name__)

#: longest one ``reserve`` call waits on a busy replica before the client looks at the others.
LEASE_WAIT_S = 2.0
#: how long one ``wait`` call on a replica blocks before the client asks again.
_WAIT_CALL_S = 30.0


def pool_key(spec: BatchSpec) -> str:
    """Replicas are shared by every job that loads the same model with the same resources."""
    loads = [spec.predictor, spec.predictor_kwargs, spec.num_gpus, spec.num_cpus]
    if spec.predictor_secrets:  # by reference: replicas of different credentials are not shared
        loads.append(spec.predictor_secrets)
    raw = json.dumps(loads, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


class ReplicaPool:
    """The replicas of the model that ``spec`` names, on the Ray cluster this process is
    connected to (:func:`~airflow_batch_provider.core.ray.connection.connect`).

    :param secrets: the values of ``spec.predictor_secrets``, needed to start a replica. They go
        to the replica through Ray's object store (``ray.put``), so Ray's task and actor
        metadata (state API, dashboard, GCS) only ever hold a reference to them.
    """

    def __init__(self, spec: BatchSpec, *, secrets: dict[str, str] | None = None, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S):
        self.spec = spec
        self.key = pool_key(spec)
        self.idle_timeout_s = idle_timeout_s
        self._secrets = secrets
        self._secrets_ref: Any = None
        self._refs: dict[str, Any] = {}  # token -> ObjectRef of calls submitted by this process

    # -- replicas -----------------------------------------------------------------------
    def size(self) -> int:
        """Replicas at most: what the cluster's resources fit (or ``spec.num_workers``)."""
        spec = self.spec
        if spec.num_workers:
            return spec.num_workers
        total = ray.cluster_resources()
        fits = []
        if spec.num_gpus:
            fits.append(int(total.get("GPU", 0) // spec.num_gpus))
        if spec.num_cpus:
            fits.append(int(total.get("CPU", 0) // spec.num_cpus))
        return max(1, min(fits) if fits else 1)

    def name(self, slot: int) -> str:
        return f"abp-{self.key}-{slot}"

    def replica(self, slot: int) -> tuple[str, Any]:
        """(name, handle) of the replica in ``slot``, created (not waited for) if missing."""
        spec = self.spec
        name = self.name(slot)
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
        return name, Replica.options(**options).remote(spec.predictor, spec.predictor_kwargs, self.idle_timeout_s, self._secret_values())

    def _secret_values(self) -> Any:
        """An ObjectRef to the predictor's secret arguments (None when it has none)."""
        if not self.spec.predictor_secrets:
            return None
        if self._secrets is None or set(self._secrets) != set(self.spec.predictor_secrets):
            raise RayWorkError(f"the predictor's secret arguments {sorted(self.spec.predictor_secrets)} were not resolved; "
                               "start replicas from a task that resolves predictor_secrets")
        if self._secrets_ref is None:
            self._secrets_ref = ray.put(self._secrets)
        return self._secrets_ref

    def start(self, wanted: int) -> list[str]:
        """Create up to ``wanted`` replicas (at most :meth:`size`) without waiting for them.

        The models load on Ray while the caller does other work (Airflow schedules the shard
        tasks); replicas that already exist are left as they are.
        """
        count = min(self.size(), wanted)
        return [self.replica(slot)[0] for slot in range(count)]

    def shutdown(self) -> int:
        """Stop this model's replicas now (instead of waiting for their idle timeout)."""
        killed = 0
        for slot in range(self.size()):
            handle = find_replica(self.name(slot))
            if handle is not None:
                ray.kill(handle, no_restart=True)
                killed += 1
        return killed

    # -- leases ---------------------------------------------------------------------------
    def lease(self, token: str, *, wait_s: float = LEASE_WAIT_S, timeout_s: float | None = None) -> tuple[str, Any]:
        """An idle replica reserved for ``token``; creates replicas up to :meth:`size`.

        When all are busy, it waits on one replica at a time (``wait_s`` each, taking turns from
        a slot that depends on ``token``, so that waiting callers spread over the replicas) and
        looks at all of them again between waits; a replica that frees up is taken at once.
        Past ``timeout_s`` (None: no deadline) it raises :class:`RayWorkError`.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        size = self.size()
        first = int(hashlib.sha256(token.encode()).hexdigest()[:8], 16) % size
        for turn in itertools.count():
            for slot in range(size):
                name, handle = self.replica(slot)
                if ray.get(handle.reserve.remote(token)):
                    return name, handle
            if deadline is not None and time.monotonic() >= deadline:
                raise RayWorkError(f"no replica of {self.spec.predictor} was free within {timeout_s:.0f} s ({size} replicas, all busy)")
            if turn == 0:
                log.info("All %d Ray replicas of this model are busy; waiting for one", size)
            name, handle = self.replica((first + turn) % size)
            if ray.get(handle.reserve.remote(token, wait_s)):
                return name, handle

    def release(self, work: dict[str, str]) -> None:
        """Give back a lease whose call was never started."""
        handle = find_replica(work["worker"])
        if handle is not None:
            ray.get(handle.release.remote(work["token"]))

    # -- work ----------------------------------------------------------------------------
    def submit(self, shards: list[Shard], attempt: dict[str, Any], storage_options: dict[str, Any] | None = None) -> dict[str, str]:
        """Lease a replica and start the shards on it; returns the work id."""
        token = attempt["token"]
        name, handle = self.lease(token)
        self._refs[token] = handle.run_shards.remote(self.spec.to_dict(), storage_options, [s.to_dict() for s in shards], attempt)
        return {"worker": name, "token": token}

    def status(self, work: dict[str, str], timeout: float | None = None) -> dict[str, Any]:
        """How the call is doing: ``Replica.status``'s answer (``state`` RUNNING, SUCCEEDED with
        ``results``, FAILED with ``error``, or UNKNOWN), LOST when the replica is gone."""
        handle = find_replica(work["worker"])
        if handle is None:
            return {"state": RunState.LOST}
        try:
            return ray.get(handle.status.remote(work["token"]), timeout=timeout)
        except ray.exceptions.RayActorError:
            return {"state": RunState.LOST}

    def wait(self, work: dict[str, str], timeout_s: float) -> dict[str, Any]:
        """:meth:`status` once the call has ended, or after ``timeout_s`` while it runs."""
        handle = find_replica(work["worker"])
        if handle is None:
            return {"state": RunState.LOST}
        return ray.get(handle.wait.remote(work["token"], timeout_s))

    def result(
        self, work: dict[str, str], *, on_progress: Callable[[Progress], None] | None = None, every_s: float = 30.0
    ) -> list[dict[str, Any]] | None:
        """Block until the call ends: its shard results, or None when the call is lost (its
        replica gone or restarted without it). Raises :class:`RayWorkError` when it failed.
        While it runs, ``on_progress`` hears how far it is every ``every_s`` seconds."""
        ref = self._refs.pop(work["token"], None)
        if ref is not None:
            while not ray.wait([ref], timeout=every_s if on_progress else None)[0]:
                if on_progress and (progress := Progress.of(self.status(work))):
                    on_progress(progress)
            try:
                return ray.get(ref)
            except Exception as err:
                raise RayWorkError(_failure_message(err)) from None
        while True:
            outcome = self.wait(work, every_s if on_progress else _WAIT_CALL_S)
            state = outcome["state"]
            if state == RunState.RUNNING:
                if on_progress and (progress := Progress.of(outcome)):
                    on_progress(progress)
                continue
            if state == RunState.SUCCEEDED:
                return outcome["results"]
            if state == RunState.FAILED:
                raise RayWorkError(f"failed on Ray: {outcome['error']}")
            return None

    def find_running(self, key: str, timeout_s: float = 2.0) -> dict[str, str] | None:
        """The work id of a call running now for attempt ``key``, or None.

        A retry normally knows its earlier try's call; this covers a try that died after
        submitting but before it recorded the call. Only replicas that exist are asked, and
        one still loading its model (it runs nothing yet) is not waited for beyond ``timeout_s``.
        """
        asked = {}
        for slot in range(self.size()):
            handle = find_replica(self.name(slot))
            if handle is not None:
                asked[handle.running_for.remote(key)] = self.name(slot)
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


def find_replica(name: str) -> Any:
    """The handle of the replica actor named ``name``, or None when there is none."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def _failure_message(err: Exception) -> str:
    """A core error raised on the replica keeps its own message; anything else is named."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BatchError):
        return str(cause)
    return f"failed on Ray: {type(cause or err).__name__}: {cause or err}"
