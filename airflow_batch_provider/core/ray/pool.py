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

A dying replica (its process, or the node under it) is restarted by Ray (``max_restarts``:
the spec's ``max_retries``) where resources allow, but its call is not retried there
(``max_task_retries=0``): the caller learns at once that the call was lost (``result``
answers None) and submits the shards again on whichever replica is free, usually one on
another node, within the same task try.

Every wait has an end: a replica that cannot be placed on any node fails at once
(:class:`ResourcesUnavailableError`, naming the resources), one that does not answer (still
loading, or waiting for a node) is passed over, and a lease gives up after its ``timeout_s``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import threading
import time
from typing import Any, Callable

import ray

from airflow_batch_provider.core.domain.planning import Shard
from airflow_batch_provider.core.errors import BatchError, RayWorkError, ResourcesUnavailableError
from airflow_batch_provider.core.ray.connection import NAMESPACE
from airflow_batch_provider.core.ray.replica import DEFAULT_IDLE_TIMEOUT_S, Replica
from airflow_batch_provider.core.ray.states import Progress, RunState
from airflow_batch_provider.core.spec import BatchSpec

log = logging.getLogger(__name__)

#: longest one ``reserve`` call waits on a busy replica before the client looks at the others.
LEASE_WAIT_S = 2.0
#: how long one ``wait`` call on a replica blocks before the client asks again.
_WAIT_CALL_S = 30.0
#: how long a lease round waits for replicas to answer (one still loading its model, or
#: waiting for a node, answers later; the next round asks again).
_ROUND_S = 5.0
#: a control call (status, wait, cancel) not answered this long after its own wait: the replica is lost.
_REPLY_S = 30.0
#: the longest one wait for a running call blocks this process (signals are handled between waits).
_POLL_S = 1.0
#: how often a caller waiting for a replica says so in its log.
_REPORT_S = 60.0
#: how long ``cancel`` lets a call stop between batches before it kills the replica.
CANCEL_GRACE_S = 10.0


#: salt and rounds of the digest of secret values in a pool key (PBKDF2-HMAC-SHA256): the
#: digest must be the same in every process of every deployment, and costly to test guesses against.
_SECRETS_SALT = b"airflow-batch-provider/replica-key/v1"
_SECRETS_ROUNDS = 200_000


def pool_key(spec: BatchSpec, secrets: dict[str, str] | None = None) -> str:
    """Replicas are shared by every job that loads the same model with the same resources and
    the same secret *values* (a rotated key gets new replicas; two deployments naming their
    key alike on one Ray cluster do not share theirs). The values enter only through a salted,
    slow digest (``secrets_digest``), and the key is a truncated hash of it: neither the value
    nor its digest is in an actor's name."""
    loads = [spec.predictor, spec.predictor_kwargs, spec.num_gpus, spec.num_cpus]
    if spec.predictor_secrets:
        if secrets is None or set(secrets) != set(spec.predictor_secrets):
            raise RayWorkError(f"the predictor's secret arguments {sorted(spec.predictor_secrets)} were not resolved; "
                               "reach its replicas from a task that resolves predictor_secrets")
        loads += [spec.predictor_secrets, secrets_digest(secrets)]
    raw = json.dumps(loads, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def secrets_digest(secrets: dict[str, str]) -> str:
    """A salted PBKDF2 digest of the secret values (never the values themselves)."""
    material = json.dumps(sorted(secrets.items())).encode()
    return hashlib.pbkdf2_hmac("sha256", material, _SECRETS_SALT, _SECRETS_ROUNDS).hex()


class ReplicaPool:
    """The replicas of the model that ``spec`` names, on the Ray cluster this process is
    connected to (:func:`~airflow_batch_provider.core.ray.connection.connect`).

    :param secrets: the values of ``spec.predictor_secrets``, needed to start a replica. They go
        to the replica through Ray's object store (``ray.put``), so Ray's task and actor
        metadata (state API, dashboard, GCS) only ever hold a reference to them.
    """

    def __init__(self, spec: BatchSpec, *, secrets: dict[str, str] | None = None, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S):
        self.spec = spec
        self._key: str | None = None
        self.idle_timeout_s = idle_timeout_s
        self._secrets = secrets
        self._secrets_ref: Any = None
        self._refs: dict[str, Any] = {}  # token -> ObjectRef of calls submitted by this process
        self._asks = itertools.count()
        self._ask_ids: dict[Any, str] = {}  # ObjectRef of a reserve call -> the id of that ask

    @property
    def key(self) -> str:
        """:func:`pool_key`, computed on first use: following a call by its work id (status,
        cancel) needs no key, and so no secrets."""
        if self._key is None:
            self._key = pool_key(self.spec, self._secrets)
        return self._key

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

    def slots(self) -> list[int]:
        """The slots to lease from: those the cluster fits now, and any whose replica still
        exists (after a node is lost the cluster fits fewer, but its replicas still serve)."""
        prefix = f"abp-{self.key}-"
        existing = set()
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"] if isinstance(entry, dict) else entry
            if (not isinstance(entry, dict) or entry.get("namespace") == NAMESPACE) and name.startswith(prefix):
                suffix = name[len(prefix):]
                if suffix.isdigit():
                    existing.add(int(suffix))
        return sorted(existing | set(range(self.size())))

    def check_feasible(self) -> None:
        """Fail at once when no live node of the cluster has the resources one replica asks
        for (``num_gpus=1`` on a cluster without GPUs): Ray would keep the replica pending forever."""
        spec = self.spec
        wanted = {"CPU": float(spec.num_cpus or 0), "GPU": float(spec.num_gpus or 0)}
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        if any(all(res.get(kind, 0.0) >= amount for kind, amount in wanted.items() if amount) for res in nodes):
            return
        have = "; ".join(f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU" for res in nodes) or "no live node"
        raise ResourcesUnavailableError(
            f"no node of the Ray cluster can run a replica of {spec.predictor}: it asks for num_cpus={spec.num_cpus:g}, "
            f"num_gpus={spec.num_gpus:g} on one node, and the live nodes have {have}. Lower num_cpus/num_gpus in the spec, "
            "or add a node with these resources to the cluster."
        )

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
            # The pool, not Ray, submits a lost call again: Ray would retry it only on this
            # actor, which waits for resources on its own node's successor, not on another replica.
            "max_task_retries": 0,
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
        self.check_feasible()
        count = min(self.size(), wanted)
        return [self.replica(slot)[0] for slot in range(count)]

    def shutdown(self, *, force: bool = False) -> int:
        """Stop this model's idle replicas now (instead of waiting for their idle timeout).

        A replica that runs a shard, or is leased to a shard task that is alive, is spared:
        replicas are shared by every run of the same model, and another run may be using it
        (it exits on its idle timeout once done). ``force`` stops every replica. Returns how
        many were stopped."""
        killed = 0
        for slot in self.slots():
            handle = find_replica(self.name(slot))
            if handle is None:
                continue
            if not force:
                try:
                    if not ray.get(handle.retire.remote(), timeout=_REPLY_S):
                        log.info("Ray replica %s is serving a shard: left running (it exits when idle)", self.name(slot))
                        continue
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass  # dead or unreachable: stopping it frees whatever it still holds
            ray.kill(handle, no_restart=True)
            killed += 1
        return killed

    # -- leases ---------------------------------------------------------------------------
    def lease(self, token: str, *, wait_s: float = LEASE_WAIT_S, timeout_s: float | None = None) -> tuple[str, Any]:
        """An idle replica reserved for ``token``; creates replicas up to :meth:`size`.

        Each round asks every replica at once and takes the first that says yes (a replica
        still loading its model answers when loaded; one that has not answered within the
        round is asked again next round, and its late answer is a no). When all are busy, it
        waits on one replica at a time (``wait_s`` each, taking turns from a slot that
        depends on ``token``, so that waiting callers spread over the replicas); a replica
        that frees up is taken at once. Past ``timeout_s`` (None: no deadline) it raises
        :class:`RayWorkError`; when no node can hold a replica, it raises
        :class:`ResourcesUnavailableError` at once.
        """
        started = time.monotonic()
        deadline = None if timeout_s is None else started + timeout_s
        holder = ray.get_runtime_context().get_job_id()
        first = int(hashlib.sha256(token.encode()).hexdigest()[:8], 16)
        reported = started
        for turn in itertools.count():
            self.check_feasible()  # every round: the only node that fits may be lost while we wait
            slots = self.slots()
            if time.monotonic() - reported >= _REPORT_S:
                log.info("Still waiting for a free Ray replica of this model after %.0f s (%d replicas)", time.monotonic() - started, len(slots))
                reported = time.monotonic()
            round_s = _ROUND_S if deadline is None else max(0.5, min(_ROUND_S, deadline - time.monotonic()))
            asks = {self._ask(slot, token, 0.0, holder, round_s): slot for slot in slots}
            granted = self._first_granted(asks, token, round_s)
            if granted is not None:
                return granted
            if deadline is not None and time.monotonic() >= deadline:
                raise RayWorkError(f"no replica of {self.spec.predictor} was free within {timeout_s:.0f} s ({len(slots)} replicas, all busy)")
            if turn == 0:
                log.info("All %d Ray replicas of this model are busy; waiting for one", len(slots))
            slot = slots[(first + turn) % len(slots)]
            wait = wait_s if deadline is None else max(0.0, min(wait_s, deadline - time.monotonic()))
            granted = self._first_granted({self._ask(slot, token, wait, holder, wait + _ROUND_S): slot}, token, wait + _ROUND_S)
            if granted is not None:
                return granted
        raise AssertionError("unreachable")

    def _ask(self, slot: int, token: str, wait_s: float, holder: str, answer_within_s: float) -> Any:
        name, handle = self.replica(slot)
        ask = f"{token}/{next(self._asks)}"
        ref = handle.reserve.remote(token, wait_s, holder, time.time() + answer_within_s, ask)
        self._ask_ids[ref] = ask
        return ref

    def _first_granted(self, asks: dict[Any, int], token: str, within_s: float) -> tuple[str, Any] | None:
        """The first replica whose ``reserve`` said yes within ``within_s``. Answers still due
        are followed in the background: a replica that says yes too late is released."""
        pending = list(asks)
        stop = time.monotonic() + within_s
        granted = None
        while pending and granted is None:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, stop - time.monotonic()))
            if not ready:
                break
            try:
                said_yes = ray.get(ready[0])
            except ray.exceptions.RayError:  # dead, restarting, or never placed: not this one
                continue
            if said_yes:
                name = self.name(asks[ready[0]])
                granted = (name, find_replica(name))
        late = {ref: (asks[ref], self._ask_ids.pop(ref, None)) for ref in pending}
        for ref in asks:
            self._ask_ids.pop(ref, None)
        if late:
            threading.Thread(target=self._release_late, args=(late, token), daemon=True).start()
        return granted

    def _release_late(self, late: dict[Any, tuple[int, str | None]], token: str) -> None:
        """Give back what a too-late ``reserve`` granted (only that ask's lease: the same
        token may hold the replica through a later ask)."""
        for ref, (slot, ask) in late.items():
            try:
                if ray.get(ref, timeout=_REPLY_S):
                    handle = find_replica(self.name(slot))
                    if handle is not None:
                        handle.release.remote(token, ask)
            except ray.exceptions.RayError:
                pass  # no answer in time: the replica refuses it (past ``not_after``)

    def release(self, work: dict[str, str]) -> None:
        """Give back a lease whose call was never started."""
        handle = find_replica(work["worker"])
        if handle is not None:
            try:
                ray.get(handle.release.remote(work["token"]), timeout=_REPLY_S)
            except ray.exceptions.RayError:
                pass  # gone or unreachable: its leases went with it, or expire

    def cancel(self, work: dict[str, str], *, grace_s: float = CANCEL_GRACE_S) -> str:
        """Stop the call ``work`` and free its replica: the replica stops it between two batches
        (a call not started yet never starts); one still running after ``grace_s`` (a hung
        predictor) is killed, and Ray starts a fresh replica in its place where
        ``max_retries`` allows. Nothing of a cancelled call is committed. Returns the state the
        call ended in (``KILLED`` when the replica had to be killed)."""
        token = work["token"]
        self._refs.pop(token, None)
        handle = find_replica(work["worker"])
        if handle is None:
            return str(RunState.LOST)
        try:
            state = ray.get(handle.cancel.remote(token), timeout=_REPLY_S)
        except ray.exceptions.RayError:
            return str(RunState.LOST)
        if state != RunState.RUNNING:
            return state
        outcome = self.wait(work, grace_s)
        if outcome["state"] != RunState.RUNNING:
            return str(outcome["state"])
        log.warning("Ray replica %s did not stop call %s within %.0f s: killing the replica", work["worker"], token, grace_s)
        ray.kill(handle, no_restart=False)
        return "KILLED"

    # -- work ----------------------------------------------------------------------------
    def submit(
        self, shards: list[Shard], attempt: dict[str, Any], storage_options: dict[str, Any] | None = None, *, lease_timeout_s: float | None = None
    ) -> dict[str, str]:
        """Lease a replica (waiting at most ``lease_timeout_s``) and start the shards on it;
        returns the work id."""
        token = attempt["token"]
        name, handle = self.lease(token, timeout_s=lease_timeout_s)
        self._refs[token] = handle.run_shards.remote(self.spec.to_dict(), storage_options, [s.to_dict() for s in shards], attempt)
        return {"worker": name, "token": token}

    def status(self, work: dict[str, str], timeout: float | None = None) -> dict[str, Any]:
        """How the call is doing: ``Replica.status``'s answer (``state`` RUNNING, SUCCEEDED with
        ``results``, FAILED with ``error``, or UNKNOWN), LOST when the replica is gone."""
        handle = find_replica(work["worker"])
        if handle is None:
            return {"state": RunState.LOST}
        try:
            return ray.get(handle.status.remote(work["token"]), timeout=_REPLY_S if timeout is None else timeout)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):  # dead, or its node does not answer
            return {"state": RunState.LOST}

    def wait(self, work: dict[str, str], timeout_s: float) -> dict[str, Any]:
        """:meth:`status` once the call has ended, or after ``timeout_s`` while it runs."""
        handle = find_replica(work["worker"])
        if handle is None:
            return {"state": RunState.LOST}
        try:
            return ray.get(handle.wait.remote(work["token"], timeout_s), timeout=timeout_s + _REPLY_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return {"state": RunState.LOST}

    def result(
        self, work: dict[str, str], *, on_progress: Callable[[Progress], None] | None = None, every_s: float = 30.0
    ) -> list[dict[str, Any]] | None:
        """Block until the call ends: its shard results, or None when the call is lost (its
        replica, or the node under it, gone or restarted without it: the caller submits the
        shards again). When it failed, raises the core error the replica raised (its type and
        message, say ``InputDataError`` naming the line) where Ray hands it back, else
        :class:`RayWorkError` carrying the message and whether a retry can help.
        While it runs, ``on_progress`` hears how far it is every ``every_s`` seconds."""
        ref = self._refs.pop(work["token"], None)
        if ref is not None:
            # Short waits: a signal (the task's execution_timeout, SIGTERM) is acted on between
            # them, not when the call ends.
            report_at = time.monotonic() + every_s
            while not ray.wait([ref], timeout=_POLL_S)[0]:
                if on_progress and time.monotonic() >= report_at:
                    report_at = time.monotonic() + every_s
                    if progress := Progress.of(self.status(work)):
                        on_progress(progress)
            try:
                return ray.get(ref)
            except ray.exceptions.RayActorError as err:  # ActorDiedError, ActorUnavailableError: the call is lost
                log.warning("Ray work %s on %s is lost: %s", work["token"], work["worker"], _failure_message(err))
                return None
            except Exception as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, BatchError):
                    raise cause from None  # the core's own error, type and message, as raised on the replica
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
                raise RayWorkError(f"failed on Ray: {outcome['error']}", retryable=outcome.get("retryable", True))
            return None

    def find_running(self, key: str, timeout_s: float = 2.0) -> dict[str, str] | None:
        """The work id of a call running now for attempt ``key``, or None.

        A retry normally knows its earlier try's call; this covers a try that died after
        submitting but before it recorded the call. Only replicas that exist are asked, and
        one still loading its model (it runs nothing yet) is not waited for beyond ``timeout_s``.
        """
        asked = {}
        for slot in self.slots():
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
