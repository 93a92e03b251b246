"""The client side of the model replicas: one ``ReplicaPool`` per model.

A pool is the set of detached ``Replica`` actors that load one model with one set of
resources (predictor, kwargs, GPUs, CPUs, the other ``SHAPE_FIELDS``; a runtime_env as shipped), named ``abp-{key}-{slot}``; every job and task that
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

Every wait has an end: a replica that no node can hold, nor any node the cluster's autoscaler
can add, fails at once (:class:`ResourcesUnavailableError`, naming the resources; see
``node_types`` for what Ray tells of the autoscaler); one that does not answer (still loading,
or waiting for a node) is passed over; a caller waiting for a node while none of the model's
replicas is up gives up after ``node_wait_timeout_s``, and a lease after its ``timeout_s``.
On an autoscaling cluster the pool grows by one replica per waiting caller (``leases``).

How many replicas the cluster fits is ``sizing``'s; how a caller gets one idle replica is
``leases``'s; following a call by its work id, in typed form, is :class:`~airflow_batch_provider.core.ray.call.ShardCall`'s.
This module holds the replicas' lifecycle and the calls' wire form (plain dicts, as Ray carries them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from typing import Any, Callable

import ray

from airflow_batch_provider.core.domain.planning import Shard
from airflow_batch_provider.core.errors import BatchError, RayWorkError, ResourcesUnavailableError
from airflow_batch_provider.core.ray import connection, on_cluster, shipping, sizing
from airflow_batch_provider.core.ray.connection import NAMESPACE
from airflow_batch_provider.core.ray.leases import LeaseNegotiator
from airflow_batch_provider.core.ray.node_types import ClusterOutlook, read_outlook
from airflow_batch_provider.core.ray.replica import Replica
from airflow_batch_provider.core.ray.states import Progress, RunState
from airflow_batch_provider.core.spec import JobSpec
from airflow_batch_provider.core.tunables import DEFAULTS, FIND_RUNNING_S, LEASE_WAIT_S, REPLY_S, RESULT_POLL_S, WAIT_CALL_S

log = logging.getLogger(__name__)


#: salt and rounds of the digest of secret values in a pool key (PBKDF2-HMAC-SHA256): the
#: digest must be the same in every process of every deployment, and costly to test guesses against.
_SECRETS_SALT = b"airflow-batch-provider/replica-key/v1"
_SECRETS_ROUNDS = 200_000


#: Ray's actor states short of DEAD.
_LIVE_ACTOR_STATES = ("DEPENDENCIES_UNREADY", "PENDING_CREATION", "RESTARTING", "ALIVE")

#: Spec fields that shape a replica besides its CPUs and GPUs: replicas differing in any are
#: different pools (an H100 replica is not an L4 one; code shipped differently is other code).
SHAPE_FIELDS = ("memory", "accelerator_type", "resources", "runtime_env")


def pool_key(spec: JobSpec, secrets: dict[str, str] | None = None, *, runtime_env: dict[str, Any] | None = None) -> str:
    """Replicas are shared by every job that loads the same model with the same resources and
    the same secret *values* (a rotated key gets new replicas; two deployments naming their
    key alike on one Ray cluster do not share theirs). The values enter only through a salted,
    slow digest (``secrets_digest``), and the key is a truncated hash of it: neither the value
    nor its digest is in an actor's name. ``runtime_env``: the spec's as shipped
    (:func:`~airflow_batch_provider.core.ray.shipping.shipped`, its directories as content-hash
    URIs), which keys the replicas in its place: new code, new replicas."""
    loads: list[Any] = [spec.predictor, spec.predictor_kwargs, spec.num_gpus, spec.num_cpus]
    shape = {name: getattr(spec, name) for name in SHAPE_FIELDS if getattr(spec, name) is not None}
    if runtime_env is not None:
        shape["runtime_env"] = runtime_env
    if shape:  # only when set: the keys (so the replicas) of specs without them stay as they were
        loads.append(shape)
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
    :param idle_timeout_s: a replica this pool starts exits after this long without work.
    :param cancel_grace_s: how long ``cancel`` lets a call stop between batches before it
        kills the replica.
    :param node_wait_timeout_s: on an autoscaling cluster, how long a caller waits for a node to
        place a replica on, while none of the model's replicas is up (None: no limit).
    """

    def __init__(
        self,
        spec: JobSpec,
        *,
        secrets: dict[str, str] | None = None,
        idle_timeout_s: float = DEFAULTS.replica_idle_timeout_s,
        cancel_grace_s: float = DEFAULTS.cancel_grace_s,
        node_wait_timeout_s: float | None = DEFAULTS.node_wait_timeout_s,
    ):
        self.spec = spec
        self._key: str | None = None
        self._runtime_env: dict[str, Any] | None = None
        self.idle_timeout_s = idle_timeout_s
        self.node_wait_timeout_s = node_wait_timeout_s
        self.cancel_grace_s = cancel_grace_s
        self._secrets = secrets
        self._secrets_ref: Any = None
        self._refs: dict[str, Any] = {}  # token -> ObjectRef of calls submitted by this process
        self._session = connection.session()  # the Ray connection ``_refs`` and ``_secrets_ref`` belong to
        self._leases = LeaseNegotiator(self)

    @property
    def key(self) -> str:
        """:func:`pool_key`, computed on first use: following a call by its work id (status,
        cancel) needs no key, and so no secrets."""
        if self._key is None:
            self._key = pool_key(self.spec, self._secrets, runtime_env=self.runtime_env)
        return self._key

    @property
    def runtime_env(self) -> dict[str, Any] | None:
        """The spec's runtime_env as the replicas get it: its local directories uploaded to the
        cluster (:func:`~airflow_batch_provider.core.ray.shipping.shipped`), once per pool."""
        if self._runtime_env is None and self.spec.runtime_env is not None:
            self._runtime_env = shipping.shipped(self.spec.runtime_env)
        return self._runtime_env

    # -- replicas -----------------------------------------------------------------------
    def size(self, outlook: ClusterOutlook | None = None) -> int:
        """Replicas the pool keeps slots for now (:func:`~airflow_batch_provider.core.ray.sizing.replica_count`):
        on an autoscaling cluster, only as many as the live nodes hold (or ``num_replicas``,
        if fewer); more are added one per waiting caller (:meth:`max_replicas`)."""
        outlook = outlook or read_outlook()
        if sizing.can_grow(outlook):
            return min(self.max_replicas(outlook) or sys.maxsize, sizing.fits_now(self.spec, list(outlook.live)))
        return sizing.replica_count(self.spec, outlook)

    def max_replicas(self, outlook: ClusterOutlook | None = None) -> int | None:
        """Replicas at most: ``num_replicas``; else what the cluster holds and can become, where
        Ray says (a fixed cluster, or published node types); None where it does not (an
        autoscaler without published node types: the pool grows one replica per waiting caller)."""
        if self.spec.num_replicas:
            return self.spec.num_replicas
        outlook = outlook or read_outlook()
        if sizing.can_grow(outlook) and not any(t.max_count > 0 for t in outlook.node_types):
            return None
        return sizing.replica_count(self.spec, outlook)

    def name(self, slot: int) -> str:
        return f"abp-{self.key}-{slot}"

    @staticmethod
    def find(name: str) -> Any:
        """The handle of the replica named ``name``, or None when there is none."""
        return find_replica(name)

    def existing_slots(self) -> set[int]:
        """The slots whose replica exists (alive, loading, restarting or waiting for a node)."""
        prefix = f"abp-{self.key}-"
        existing = set()
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"] if isinstance(entry, dict) else entry
            if (not isinstance(entry, dict) or entry.get("namespace") == NAMESPACE) and name.startswith(prefix):
                suffix = name[len(prefix):]
                if suffix.isdigit():
                    existing.add(int(suffix))
        return existing

    def slots(self, outlook: ClusterOutlook | None = None) -> list[int]:
        """The slots to lease from: those the cluster fits now, and any whose replica still
        exists (after a node is lost the cluster fits fewer, but its replicas still serve)."""
        return sorted(self.existing_slots() | set(range(self.size(outlook))))

    def replica_states(self) -> dict[int, str]:
        """Ray's state of each existing replica by slot: ALIVE (up, model loaded),
        PENDING_CREATION (waiting for a node, or loading), RESTARTING, DEPENDENCIES_UNREADY."""
        return on_cluster.ask(replica_states_named, f"abp-{self.key}-")

    def check_feasible(self) -> ClusterOutlook:
        """Fail at once when no node can hold a replica, and none the autoscaler can add
        (:func:`~airflow_batch_provider.core.ray.sizing.check_feasible`); the replicas of this
        model that wait for a node are stopped then (they would wait forever, and keep asking
        the autoscaler for a node). Returns what it read of the cluster."""
        try:
            return sizing.check_feasible(self.spec)
        except ResourcesUnavailableError:
            self._stop_unplaced()
            raise

    def _stop_unplaced(self) -> None:
        for slot, state in self.replica_states().items():
            if state in ("PENDING_CREATION", "DEPENDENCIES_UNREADY") and (handle := self.find(self.name(slot))) is not None:
                ray.kill(handle, no_restart=True)

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
        for option in SHAPE_FIELDS:
            # Only when set: a runtime_env keeps the replica off Ray's pre-started worker
            # processes (a new process, and its environment set up, per replica).
            if getattr(spec, option) is not None:
                options[option] = self.runtime_env if option == "runtime_env" else getattr(spec, option)
        return name, Replica.options(**options).remote(spec.predictor, spec.predictor_kwargs, self.idle_timeout_s, self._secret_values())

    def _secret_values(self) -> Any:
        """An ObjectRef to the predictor's secret arguments (None when it has none)."""
        if not self.spec.predictor_secrets:
            return None
        if self._secrets is None or set(self._secrets) != set(self.spec.predictor_secrets):
            raise RayWorkError(f"the predictor's secret arguments {sorted(self.spec.predictor_secrets)} were not resolved; "
                               "start replicas from a task that resolves predictor_secrets")
        self._drop_lost_refs()
        if self._secrets_ref is None:
            self._secrets_ref = ray.put(self._secrets)
        return self._secrets_ref

    def start(self, wanted: int) -> list[str]:
        """Create up to ``wanted`` replicas without waiting for them: ``min_replicas`` when the
        spec sets it, at most :meth:`size` on a fixed cluster and :meth:`max_replicas` on an
        autoscaling one (a replica waiting for a node is what asks the autoscaler for one, so
        the nodes are asked for right away).

        The models load on Ray while the caller does other work (Airflow schedules the shard
        tasks); replicas that already exist are left as they are.
        """
        outlook = self.check_feasible()
        if self.spec.min_replicas is not None:
            wanted = self.spec.min_replicas
        limit = (self.max_replicas(outlook) or sys.maxsize) if sizing.can_grow(outlook) else self.size(outlook)
        count = min(limit, wanted)
        return [self.replica(slot)[0] for slot in range(count)]

    def shutdown(self, *, force: bool = False) -> int:
        """Stop this model's idle replicas now (instead of waiting for their idle timeout).

        A replica that runs a shard, or is leased to a shard task that is alive, is spared:
        replicas are shared by every run of the same model, and another run may be using it
        (it exits on its idle timeout once done). ``force`` stops every replica. Returns how
        many were stopped."""
        killed = 0
        states_alive = {slot for slot, state in self.replica_states().items() if state != "PENDING_CREATION"}
        for slot in self.slots():
            handle = self.find(self.name(slot))
            if handle is None:
                continue
            if not force and slot not in states_alive:  # never placed (waiting for a node): nothing of it runs
                ray.kill(handle, no_restart=True)
                killed += 1
                continue
            if not force:
                try:
                    if not ray.get(handle.retire.remote(), timeout=REPLY_S):
                        log.info("Ray replica %s is serving a shard: left running (it exits when idle)", self.name(slot))
                        continue
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass  # dead or unreachable: stopping it frees whatever it still holds
            ray.kill(handle, no_restart=True)
            killed += 1
        return killed

    # -- leases ---------------------------------------------------------------------------
    def lease(self, token: str, *, wait_s: float = LEASE_WAIT_S, timeout_s: float | None = None) -> tuple[str, Any]:
        """An idle replica reserved for ``token`` (:meth:`LeaseNegotiator.lease <airflow_batch_provider.core.ray.leases.LeaseNegotiator.lease>`)."""
        return self._leases.lease(token, wait_s=wait_s, timeout_s=timeout_s)

    def release(self, work: dict[str, str]) -> None:
        """Give back a lease whose call was never started."""
        handle = self.find(work["worker"])
        if handle is not None:
            try:
                ray.get(handle.release.remote(work["token"]), timeout=REPLY_S)
            except ray.exceptions.RayError:
                pass  # gone or unreachable: its leases went with it, or expire

    def cancel(self, work: dict[str, str], *, grace_s: float | None = None) -> str:
        """Stop the call ``work`` and free its replica: the replica stops it between two batches
        (a call not started yet never starts); one still running after ``grace_s`` (a hung
        predictor) is killed, and Ray starts a fresh replica in its place where
        ``max_retries`` allows. Nothing of a cancelled call is committed. Returns the state the
        call ended in (``KILLED`` when the replica had to be killed)."""
        grace_s = self.cancel_grace_s if grace_s is None else grace_s
        token = work["token"]
        self._refs.pop(token, None)
        handle = self.find(work["worker"])
        if handle is None:
            return str(RunState.LOST)
        try:
            state = ray.get(handle.cancel.remote(token), timeout=REPLY_S)
        except ray.exceptions.RayError:
            return str(RunState.LOST)
        if state != RunState.RUNNING:
            return state
        outcome = self.wait(work, grace_s)
        if outcome["state"] != RunState.RUNNING:
            return str(outcome["state"])
        log.warning("Ray replica %s did not stop call %s within %.0f s: killing the replica", work["worker"], token, grace_s)
        ray.kill(handle, no_restart=False)
        return str(RunState.KILLED)

    # -- work ----------------------------------------------------------------------------
    def submit(
        self, shards: list[Shard], attempt: dict[str, Any], storage_options: dict[str, Any] | None = None, *, lease_timeout_s: float | None = None
    ) -> dict[str, str]:
        """Lease a replica (waiting at most ``lease_timeout_s``) and start the shards on it;
        returns the work id."""
        token = attempt["token"]
        self._drop_lost_refs()
        name, handle = self.lease(token, timeout_s=lease_timeout_s)
        self._refs[token] = handle.run_shards.remote(self.spec.to_dict(), storage_options, [s.to_dict() for s in shards], attempt)
        return {"worker": name, "token": token}

    def status(self, work: dict[str, str], timeout: float | None = None) -> dict[str, Any]:
        """How the call is doing: ``Replica.status``'s answer (``state`` RUNNING, SUCCEEDED with
        ``results``, FAILED with ``error``, or UNKNOWN), LOST when the replica is gone."""
        handle = self.find(work["worker"])
        if handle is None:
            return {"state": RunState.LOST}
        try:
            return ray.get(handle.status.remote(work["token"]), timeout=REPLY_S if timeout is None else timeout)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):  # dead, or its node does not answer
            return {"state": RunState.LOST}

    def wait(self, work: dict[str, str], timeout_s: float) -> dict[str, Any]:
        """:meth:`status` once the call has ended, or after ``timeout_s`` while it runs."""
        handle = self.find(work["worker"])
        if handle is None:
            return {"state": RunState.LOST}
        try:
            return ray.get(handle.wait.remote(work["token"], timeout_s), timeout=timeout_s + REPLY_S)
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
        While it runs, ``on_progress`` hears how far it is every ``every_s`` seconds.

        A call this process submitted is followed by its Ray reference, which hands back the
        replica's own exception and sees the replica die at once; a call found again (a retry
        reconnecting to an earlier try's call) has no reference here and is followed by asking
        its replica (``wait``), as is one whose reference went with a lost connection (this
        process connected again: :func:`~airflow_batch_provider.core.ray.connection.reconnect`)."""
        self._drop_lost_refs()
        ref = self._refs.pop(work["token"], None)
        if ref is not None:
            return self._result_of_submitted(ref, work, on_progress, every_s)
        return self._result_by_asking(work, on_progress, every_s)

    def _drop_lost_refs(self) -> None:
        """Forget the object references of a Ray connection this process lost: they name
        objects of a session that is gone (the calls run on; they are followed by asking)."""
        if self._session != connection.session():
            self._session = connection.session()
            self._refs.clear()
            self._secrets_ref = None

    def _result_of_submitted(
        self, ref: Any, work: dict[str, str], on_progress: Callable[[Progress], None] | None, every_s: float
    ) -> list[dict[str, Any]] | None:
        # Short waits: a signal (the task's execution_timeout, SIGTERM) is acted on between
        # them, not when the call ends.
        report_at = time.monotonic() + every_s
        while not ray.wait([ref], timeout=RESULT_POLL_S)[0]:
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
            if connection.is_lost_connection(err):
                raise  # this process's connection, not the call: the caller connects again and asks
            cause = getattr(err, "cause", None)
            if isinstance(cause, BatchError):
                raise cause from None  # the core's own error, type and message, as raised on the replica
            raise RayWorkError(_failure_message(err)) from None

    def _result_by_asking(
        self, work: dict[str, str], on_progress: Callable[[Progress], None] | None, every_s: float
    ) -> list[dict[str, Any]] | None:
        while True:
            outcome = self.wait(work, every_s if on_progress else WAIT_CALL_S)
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

    def find_running(self, key: str, timeout_s: float = FIND_RUNNING_S) -> dict[str, str] | None:
        """The work id of a call running now for attempt ``key``, or None.

        A retry normally knows its earlier try's call; this covers a try that died after
        submitting but before it recorded the call. Only replicas that exist are asked, and
        one still loading its model (it runs nothing yet) is not waited for beyond ``timeout_s``.
        """
        asked = {}
        for slot in self.slots():
            handle = self.find(self.name(slot))
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


def replica_states_named(prefix: str) -> dict[int, str]:
    """:meth:`ReplicaPool.replica_states` of the replicas named ``{prefix}{slot}``, from Ray's actor table."""
    from ray._private.state import actors

    states: dict[int, str] = {}
    # Asked by state, the GCS filtering: its table also keeps the cluster's dead actors (many).
    for state in _LIVE_ACTOR_STATES:
        for info in actors(actor_state_name=state).values():
            name = info.get("Name") or ""
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                states[int(name[len(prefix):])] = info["State"]
    return states


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
