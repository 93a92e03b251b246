"""Lease negotiation: how a caller gets one idle replica of a model, and only one.

A caller asks every replica at once (``Replica.reserve``) and takes the first that says yes.
A replica that is still loading its model answers late; an answer that comes after the
caller stopped waiting is given back in the background, so a replica is never leased to a
caller that does not know it holds it. When every replica is busy, the caller waits *on* one
replica at a time (a blocking ``reserve``), so it gets the replica the moment its running
shard ends: with more shard tasks than replicas, the next shard starts on a warm replica
without waiting for Airflow to schedule its task.

On an autoscaling cluster a caller that finds no free replica, while every replica is up, adds
one (its pending placement asks the autoscaler for a node), so the pool grows with the callers
waiting and no further; while none of the model's replicas is up, the caller says what node it
waits for and gives up after the pool's ``node_wait_timeout_s``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from typing import Any, NoReturn, Protocol

import ray

from airflow_batch_provider.core.errors import BatchError, PredictorError, RayWorkError
from airflow_batch_provider.core.ray.node_types import ClusterOutlook, describe_resources
from airflow_batch_provider.core.spec import JobSpec
from airflow_batch_provider.core.tunables import LEASE_ROUND_S, LEASE_WAIT_S, REPLY_S, WAITING_REPORT_S

log = logging.getLogger(__name__)


class Replicas(Protocol):
    """What negotiating a lease needs of the model's replicas (``ReplicaPool`` has it)."""

    spec: JobSpec
    node_wait_timeout_s: float | None

    def check_feasible(self) -> ClusterOutlook: ...

    def slots(self, outlook: ClusterOutlook | None = None) -> list[int]: ...

    def existing_slots(self) -> set[int]: ...

    def replica_states(self) -> dict[int, str]: ...

    def max_replicas(self, outlook: ClusterOutlook | None = None) -> int | None: ...

    def name(self, slot: int) -> str: ...

    def replica(self, slot: int) -> tuple[str, Any]: ...

    def find(self, name: str) -> Any: ...


class LeaseNegotiator:
    """Leases replicas of ``pool`` to callers of this process; each ask has an id of its own,
    so that giving back a too-late yes frees exactly the lease that ask got."""

    def __init__(self, pool: Replicas) -> None:
        self.pool = pool
        self._asks = itertools.count()

    def lease(self, token: str, *, wait_s: float = LEASE_WAIT_S, timeout_s: float | None = None) -> tuple[str, Any]:
        """An idle replica reserved for ``token``, as (name, handle); creates replicas up to
        the pool's size.

        Each round asks every replica at once and takes the first that says yes (a replica
        still loading its model answers when loaded; one that has not answered within the
        round is asked again next round, and its late answer is a no). When all are busy, it
        waits on one replica at a time (``wait_s`` each, taking turns from a slot that
        depends on ``token``, so that waiting callers spread over the replicas); a replica
        that frees up is taken at once. Past ``timeout_s`` (None: no deadline) it raises
        :class:`RayWorkError`; when no node can hold a replica, it raises
        :class:`~airflow_batch_provider.core.errors.ResourcesUnavailableError` at once.
        """
        pool = self.pool
        started = time.monotonic()
        deadline = None if timeout_s is None else started + timeout_s
        holder = ray.get_runtime_context().get_job_id()
        first = int(hashlib.sha256(token.encode()).hexdigest()[:8], 16)
        reported = started
        grown: int | None = None  # the slot of the replica this caller added
        for turn in itertools.count():
            outlook = pool.check_feasible()  # every round: the only node that fits may be lost while we wait
            slots = pool.slots(outlook)
            waiting_for_node = None  # what this caller waits for, while none of the model's replicas is up
            if outlook.autoscaler is not None:
                states = pool.replica_states()
                if grown is None and (turn > 0 or not slots) and self._may_grow(outlook, states):
                    grown = min(set(range(len(states) + 1)) - set(states))
                    slots = sorted(set(slots) | {grown})  # one new replica per waiting caller: the pool grows with the demand
                if not any(state == "ALIVE" for state in states.values()):
                    waited = time.monotonic() - started
                    waiting_for_node = self._waiting_line(states, max(len(states), len(slots)), waited)
                    if pool.node_wait_timeout_s is not None and waited > pool.node_wait_timeout_s:
                        raise RayWorkError(
                            f"{waiting_for_node}: no node joined within node_wait_timeout_s={pool.node_wait_timeout_s:g} s "
                            f"(the autoscaler has {outlook.pending_launches} node launch(es) pending). See why with `ray status` "
                            "on the cluster (a cloud quota, the node type's max_workers, an image that does not start), or "
                            "raise node_wait_timeout_s in [batch_inference].", retryable=True)
            if not slots:
                raise RayWorkError(f"no replica of {pool.spec.predictor} can be started: the pool is at its maximum "
                                   f"({pool.max_replicas(outlook)}) and none exists", retryable=True)
            if time.monotonic() - reported >= WAITING_REPORT_S or (turn == 0 and waiting_for_node):
                if waiting_for_node:
                    log.info("%s", waiting_for_node)
                else:
                    log.info("Still waiting for a free Ray replica of this model after %.0f s (%d replicas)", time.monotonic() - started, len(slots))
                reported = time.monotonic()
            round_s = LEASE_ROUND_S if deadline is None else max(0.5, min(LEASE_ROUND_S, deadline - time.monotonic()))
            granted = self._first_granted([self._ask(slot, token, 0.0, holder, round_s) for slot in slots], token, round_s)
            if granted is not None:
                return self._served(granted, grown)
            if deadline is not None and time.monotonic() >= deadline:
                raise RayWorkError(f"no replica of {pool.spec.predictor} was free within {timeout_s:.0f} s "
                                   + (f"({waiting_for_node})" if waiting_for_node else f"({len(slots)} replicas, all busy)"))
            if turn == 0 and not waiting_for_node:
                log.info("All %d Ray replicas of this model are busy; waiting for one", len(slots))
            slot = slots[(first + turn) % len(slots)]
            wait = wait_s if deadline is None else max(0.0, min(wait_s, deadline - time.monotonic()))
            granted = self._first_granted([self._ask(slot, token, wait, holder, wait + LEASE_ROUND_S)], token, wait + LEASE_ROUND_S)
            if granted is not None:
                return self._served(granted, grown)
        raise AssertionError("unreachable")

    def _served(self, granted: tuple[str, Any], grown: int | None) -> tuple[str, Any]:
        """A caller served by another replica than the one it added stops that one while it
        still waits for a node: nobody waits for it any more, and it would keep the autoscaler
        launching (or, placed later, hold a node until its idle timeout)."""
        if grown is not None and granted[0] != self.pool.name(grown) and self.pool.replica_states().get(grown) == "PENDING_CREATION":
            handle = self.pool.find(self.pool.name(grown))
            if handle is not None:
                ray.kill(handle, no_restart=True)
        return granted

    def _may_grow(self, outlook: ClusterOutlook, states: dict[int, str]) -> bool:
        """Whether this waiting caller adds a replica: below the maximum, and every existing
        replica placed and up (one waiting for a node already asks the autoscaler for it)."""
        limit = self.pool.max_replicas(outlook)
        if limit is not None and len(states) >= limit:
            return False
        return all(state in ("ALIVE", "RESTARTING") for state in states.values())

    def _waiting_line(self, states: dict[int, str], replicas: int, waited: float) -> str:
        """``waiting for a node with 1 CPU, 1 GPU for a replica of ...: 0 of 2 replicas up, 45 s``."""
        up = sum(1 for state in states.values() if state == "ALIVE")
        return (f"waiting for a node with {describe_resources(self.pool.spec.replica_resources())} for a replica of "
                f"{self.pool.spec.predictor}: {up} of {replicas} replicas up, {waited:.0f} s")

    def _ask(self, slot: int, token: str, wait_s: float, holder: str, answer_within_s: float) -> _Ask:
        _, handle = self.pool.replica(slot)
        ask_id = f"{token}/{next(self._asks)}"
        return _Ask(slot, ask_id, handle.reserve.remote(token, wait_s, holder, time.time() + answer_within_s, ask_id))

    def _first_granted(self, asks: list[_Ask], token: str, within_s: float) -> tuple[str, Any] | None:
        """The first replica whose ``reserve`` said yes within ``within_s``. Answers still due
        are followed in the background: a replica that says yes too late is released."""
        by_ref = {ask.ref: ask for ask in asks}
        pending = list(by_ref)
        stop = time.monotonic() + within_s
        granted = None
        while pending and granted is None:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, stop - time.monotonic()))
            if not ready:
                break
            try:
                said_yes = ray.get(ready[0])
            except ray.exceptions.RayTaskError as err:  # the replica answered with its load error
                self._unloadable(by_ref[ready[0]].slot, err)
            except ray.exceptions.RayError:  # dead, restarting, or never placed: not this one
                continue
            if said_yes:
                name = self.pool.name(by_ref[ready[0]].slot)
                granted = (name, self.pool.find(name))
        if pending:
            late = [by_ref[ref] for ref in pending]
            threading.Thread(target=self._release_late, args=(late, token), daemon=True).start()
        return granted

    def _unloadable(self, slot: int, err: Exception) -> NoReturn:
        """A replica that could not build its predictor (``Replica.load_error``): it is stopped
        (it would answer every caller the same, holding its CPUs/GPUs) and its error raised
        at once, as the core raised it on the replica where it is one of the core's, else as
        a :class:`PredictorError` naming it. Waiting would not help: every new replica of the
        same spec on the same cluster loads the same way."""
        handle = self.pool.find(self.pool.name(slot))
        if handle is not None:
            ray.kill(handle, no_restart=True)
        cause = getattr(err, "cause", None)
        if isinstance(cause, BatchError):
            raise cause from None
        what = f"{type(cause).__name__}: {cause}" if cause is not None else str(err)
        raise PredictorError(f"the Ray replica could not load predictor={self.pool.spec.predictor!r}: {what}") from None

    def _release_late(self, late: list[_Ask], token: str) -> None:
        """Give back what a too-late ``reserve`` granted (only that ask's lease: the same
        token may hold the replica through a later ask)."""
        for ask in late:
            try:
                if ray.get(ask.ref, timeout=REPLY_S):
                    handle = self.pool.find(self.pool.name(ask.slot))
                    if handle is not None:
                        handle.release.remote(token, ask.ask_id)
            except (ray.exceptions.RayError, ConnectionError):
                # no answer in time: the replica refuses it (past ``not_after``); or this
                # process lost its Ray Client connection: its job, the lease's holder, is gone
                pass


class _Ask:
    """One ``reserve`` request in flight: which slot, its id, and the reference to its answer."""

    __slots__ = ("ask_id", "ref", "slot")

    def __init__(self, slot: int, ask_id: str, ref: Any) -> None:
        self.slot, self.ask_id, self.ref = slot, ask_id, ref
