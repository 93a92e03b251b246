"""The life of one work unit's Ray call, in one place: what a host follows it with.

A shard task submits its shards to a model replica (``submit``), waits until the replica has
taken the call up (``wait_started``: until then only a lease holds the replica for it), follows
it to its end (``follow``, or a trigger's ``outcome`` polls), submits it again on another
replica when it was lost with its replica or node (``resubmit``, within the spec's
``max_retries`` per try), and stops it when the task is stopped (``cancel``). A lost Ray
Client connection loses no call: the process connects again and follows the call by its id.

The sync operator, the deferred operator and the trigger all drive this object; the host
supplies what only it knows (the attempt key shared by the tries of one task, the try number,
the storage credentials, its logger) and keeps what only it may keep (``task_state_store``).

The replicas are reached through ``pool``: a :class:`~airflow_batch_provider.core.ray.pool.ReplicaPool`
in a task process, or, in Airflow's triggerer (which must not join a Ray cluster), anything
with the pool's ``status`` and ``cancel`` (:class:`DriverFollower`). The pool speaks plain
JSON (work ids and outcomes as dicts, as Ray carries them); this object hands typed values
(:class:`WorkId`, :class:`CallOutcome`, :class:`ShardResult`) to its host.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Protocol

from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.planning import Shard
from airflow_batch_provider.core.domain.results import ShardResult
from airflow_batch_provider.core.errors import BatchError, CallLostError, RayWorkError
from airflow_batch_provider.core.ray import connection
from airflow_batch_provider.core.ray.states import CallOutcome, Progress, WorkId
from airflow_batch_provider.core.tunables import RECONNECTS_PER_FOLLOW, STARTED_POLL_S, TRIGGER_STATUS_S

_log = logging.getLogger(__name__)



class Follower(Protocol):
    """What following a call needs of the replicas (the trigger has only this)."""

    def status(self, work: dict[str, str]) -> dict[str, Any]: ...

    def cancel(self, work: dict[str, str]) -> str: ...


class Pool(Follower, Protocol):
    """What submitting and waiting need too (a task process, connected to Ray)."""

    def submit(self, shards: list[Shard], attempt: dict[str, Any], storage_options: dict[str, Any] | None, *,
               lease_timeout_s: float | None = None) -> dict[str, str]: ...

    def result(self, work: dict[str, str], *, on_progress: Callable[[Progress], None] | None = None,
               every_s: float = 30.0) -> list[dict[str, Any]] | None: ...

    def find_running(self, key: str) -> dict[str, str] | None: ...


class ShardCall:
    """One work unit's call on the replicas of its model.

    :param pool: the replicas (see the module's docstring).
    :param shards: the unit's shards (their JSON form, as the plan handed them out), computed
        one after another on one replica.
    :param unit: names the unit by its shards (a stored call of another unit is never adopted).
    :param label: the unit as messages name it.
    :param key: what every try of the host's task on this unit shares (finds an earlier try's call).
    :param try_number: the host's try (1: no earlier try can have left a call running).
    :param max_retries: how often one try submits a lost call again (the spec's ``max_retries``).
    :param plan_id: the plan the shards belong to (a shard of a replaced plan never commits).
    :param storage_options: credentials for the sink, handed to the replica with the call.
    :param lease_timeout_s: how long ``submit`` waits for a free replica (None: no limit).
    :param log: where the call's story is told (the host's task log).
    """

    def __init__(
        self,
        pool: Any,
        shards: list[dict[str, Any]],
        *,
        unit: str,
        label: str,
        key: str = "",
        try_number: int = 1,
        max_retries: int = 0,
        plan_id: str | None = None,
        storage_options: dict[str, Any] | None = None,
        lease_timeout_s: float | None = None,
        log: logging.Logger | Any = _log,
    ) -> None:
        self.pool = pool
        self.shards = shards
        self.unit = unit
        self.label = label
        self.key = key
        self.try_number = try_number
        self.max_retries = max_retries
        self.plan_id = plan_id
        self.storage_options = storage_options
        self.lease_timeout_s = lease_timeout_s
        self.log = log
        #: the call this process follows now (what ``cancel_followed`` stops)
        self.followed: WorkId | None = None
        self._outcomes: dict[str, CallOutcome] = {}
        self._results: list[ShardResult] | None = None  # the unit's, once one of its calls ended well

    # -- submitting ------------------------------------------------------------------------
    def adopt(self, stored: Any) -> WorkId | None:
        """The call an earlier try recorded, typed; None when it computed other shards (the
        plan ran again in this DAG run and mapped this index anew): then this unit is submitted."""
        if not isinstance(stored, dict) or "token" not in stored:
            return None
        work = WorkId.from_dict(stored)
        if work.unit and work.unit != self.unit:
            self.log.warning(
                "The stored Ray work %s computed other shards than %s (the plan ran again in this DAG run and "
                "mapped this index anew); submitting this unit's shards", stored, self.label,
            )
            return None
        return work

    def submit(self) -> WorkId:
        """Start the unit on a free replica. A retry first looks for a call of its unit that an
        earlier try submitted but died before recording, and follows that one instead."""
        if self.try_number > 1 and (running := self.pool.find_running(self.key)):
            self.log.info("Reconnecting to running Ray work %s of an earlier try (its id was never stored)", running)
            return WorkId.from_dict({**running, "unit": self.unit})
        attempt = new_attempt(self.key, try_number=self.try_number, plan_id=self.plan_id)
        session = connection.session()
        try:
            raw = self.pool.submit([Shard.from_dict(s) for s in self.shards], attempt, self.storage_options, lease_timeout_s=self.lease_timeout_s)
        except Exception as err:
            if not connection.is_lost_connection(err):
                raise
            # The connection went while submitting: the call may have reached its replica.
            # Connect again, follow it if it runs, else submit (a lease the lost session got
            # is freed with its holder, that session's Ray job).
            self._reconnect(session, err, 1)
            if running := self.pool.find_running(self.key):
                self.log.info("Following Ray work %s, submitted as the connection to Ray was lost", running)
                return WorkId.from_dict({**running, "unit": self.unit})
            raw = self.pool.submit([Shard.from_dict(s) for s in self.shards], attempt, self.storage_options, lease_timeout_s=self.lease_timeout_s)
        work = WorkId.from_dict({**raw, "unit": self.unit})
        self.log.info("Shard(s) %s submitted to Ray replica %s (attempt %s)", self.label, work.replica, work.token)
        return work

    def resubmit(self, lost: WorkId, resubmits: int) -> WorkId:
        """``lost`` went with its replica or node: submit the unit again (another replica, same
        try). ``resubmits`` counts this one; past ``max_retries`` raises :class:`CallLostError`."""
        if resubmits > self.max_retries:
            raise CallLostError(
                f"shard(s) {self.label}: the Ray work was lost {resubmits} times (replica or node gone), more than the "
                f"spec's max_retries={self.max_retries}; a task retry computes what is not committed"
            )
        self.log.warning("Ray work %s is gone (replica or its node lost); computing what is not committed on another "
                         "replica (%s of max_retries=%s)", lost.to_dict(), resubmits, self.max_retries)
        return self.submit()

    # -- following -------------------------------------------------------------------------
    def outcome(self, work: WorkId) -> CallOutcome:
        """How the call is doing now (LOST when its replica is gone). A lost Ray Client
        connection is connected again first (:meth:`_reconnect`)."""
        session = connection.session()
        try:
            raw = self.pool.status(work.to_dict())
        except Exception as err:
            if not connection.is_lost_connection(err):
                raise
            self._reconnect(session, err, 1)
            raw = self.pool.status(work.to_dict())
        outcome = CallOutcome.from_dict(raw)
        if outcome.ended:
            self._outcomes[work.token] = outcome
        return outcome

    def wait_started(self, work: WorkId, timeout_s: float) -> CallOutcome:
        """Wait until the replica runs the call (or reports its end), not only holds its lease;
        after ``timeout_s`` the outcome as it is.

        Until the replica's compute thread takes the call up, the lease is all that keeps the
        replica for it, and the lease lasts as long as its holder, this process's Ray job. A
        host that is about to end its process (a task deferring to a trigger) must wait for
        this: the replica, seeing its holder gone, would lease itself to another shard task,
        whose call would then wait behind this one unseen and be taken for lost."""
        deadline = time.monotonic() + timeout_s
        while True:
            outcome = self.outcome(work)
            if outcome.started or time.monotonic() > deadline:
                return outcome
            time.sleep(STARTED_POLL_S)

    def follow(
        self,
        work: WorkId,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        every_s: float = 30.0,
        on_resubmit: Callable[[WorkId], None] | None = None,
    ) -> list[ShardResult]:
        """Block until the unit is done: its shard results. A call lost with its replica or
        node is submitted again (``resubmit``), and ``on_resubmit`` hears of each new call (the
        host records it). Raises the core error the replica raised when the call failed.

        If the wait is interrupted (the host's deadline, the task being stopped), the Ray call
        is cancelled first, so its replica is free for other shards at once."""
        resubmits = 0
        while True:
            results = self._wait(work, on_progress, every_s)
            if results is not None:
                self._results = results
                return results
            resubmits += 1
            work = self.resubmit(work, resubmits)
            if on_resubmit is not None:
                on_resubmit(work)

    def _wait(self, work: WorkId, on_progress: Callable[[Progress], None] | None, every_s: float) -> list[ShardResult] | None:
        """One call's end (None: lost). A lost connection to Ray (Ray Client past its own
        reconnect grace period) does not lose the call: it runs on in its detached replica,
        so this process connects again and follows it by its work id, within the same try."""
        self.followed = work
        reconnects = 0
        while True:
            session = connection.session()
            try:
                raw = self.pool.result(work.to_dict(), on_progress=on_progress, every_s=every_s)
                break
            except BaseException as err:
                if connection.is_lost_connection(err):
                    reconnects += 1
                    self._reconnect(session, err, reconnects)
                    self.log.info("Following Ray work %s of shard(s) %s again by its id", work.token, self.label)
                    continue
                if isinstance(err, BatchError):  # the call failed: nothing left to cancel
                    self.followed = None
                    raise
                self.cancel_followed()
                if isinstance(err, SystemError) and err.__cause__ is not None:
                    raise err.__cause__ from None  # raised by a signal handler while Ray's C code waited: Ray wraps it
                raise
        self.followed = None
        return None if raw is None else [ShardResult.from_dict(r) for r in raw]

    def _reconnect(self, session: int, err: BaseException, reconnects: int) -> None:
        """Connect this process to Ray again after it lost ``session`` (at most
        ``RECONNECTS_PER_FOLLOW`` times per follow); a connection that cannot be made within
        the connect timeout fails the try (retryable: the call's commit is not lost)."""
        if reconnects > RECONNECTS_PER_FOLLOW:
            raise RayWorkError(f"shard(s) {self.label}: the connection to Ray was lost {reconnects} times while following "
                               f"its call (last: {err}); a task retry follows the call again") from err
        self.log.warning("The connection to Ray was lost while following shard(s) %s (%s: %s); connecting again",
                         self.label, type(err).__name__, err)
        connection.reconnect(session, err)

    def results_of(self, work: WorkId) -> list[ShardResult]:
        """The unit's results once a call of it ended well: those ``follow`` got (whichever
        call, after resubmissions, computed them), else ``work``'s (asked unless just seen)."""
        if self._results is not None:
            return self._results
        outcome = self._outcomes.get(work.token) or self.outcome(work)
        return outcome.results

    # -- stopping --------------------------------------------------------------------------
    def cancel(self, work: WorkId) -> str:
        """Stop ``work`` and free its replica; returns the state the call ended in. Nothing of
        a cancelled call is committed."""
        return str(self.pool.cancel(work.to_dict()))

    def cancel_followed(self) -> None:
        """Stop the call this process follows, if any (the host is being stopped)."""
        work, self.followed = self.followed, None
        if work is None:
            return
        try:
            state = self.cancel(work)
        except Exception as err:  # the host stops anyway; the replica ends the call when it can
            self.log.warning("Could not cancel Ray work %s: %s: %s", work.to_dict(), type(err).__name__, err)
            return
        self.log.warning("Cancelled Ray work %s of shard(s) %s (it was %s); nothing of it was committed", work.token, self.label, state)

    def __repr__(self) -> str:
        return f"ShardCall({self.label!r}, following={self.followed})"


class DriverFollower:
    """The pool's ``status`` and ``cancel`` through a :class:`~airflow_batch_provider.core.ray.driver.RayDriver`
    (a Ray client child process): how Airflow's triggerer follows a call without joining Ray."""

    def __init__(self, driver: Any, spec: dict[str, Any], *, cancel_grace_s: float | None = None) -> None:
        self.driver = driver
        self.spec = spec
        self.cancel_grace_s = cancel_grace_s  # None: the pool's default

    def status(self, work: dict[str, str]) -> dict[str, Any]:
        return self.driver.call("status", self.spec, work=work, timeout=TRIGGER_STATUS_S)

    def cancel(self, work: dict[str, str]) -> str:
        if self.cancel_grace_s is None:
            return self.driver.call("cancel", self.spec, work=work)
        return self.driver.call("cancel", self.spec, work=work, grace_s=self.cancel_grace_s)
