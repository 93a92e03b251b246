"""The model replica: a long-lived Ray actor that loads the model once and runs shards.

Every shard task is a separate Ray driver (job), and Ray's task workers do not outlive their
job, so a model cached in a task worker would be loaded again for every shard. Instead shards
run on *detached named actors* (``Replica``), keyed by what they load (predictor, kwargs,
resources; see ``pool.py``), which stay warm for the next shard, in this run or the next, and
exit on their own after ``idle_timeout_s`` without work, freeing their GPUs.

A replica runs one call at a time (its "compute" group) and answers control calls beside it:
``reserve``/``release`` lease it to one caller, ``status``/``wait`` report a call by its
attempt token (``states.RunState``), ``running_for`` finds the call of an attempt key,
``cancel`` stops a call between batches, ``retire`` lets a cleanup stop only an idle replica.

A lease names its holder (the caller's Ray job): a shard task that dies between leasing and
starting its call frees the replica as soon as Ray reports its job finished, not after
``LEASE_TIMEOUT_S``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any

import ray

from airflow_batch_provider.core.domain.planning import Shard
from airflow_batch_provider.core.errors import ShardCancelledError, is_retryable
from airflow_batch_provider.core.ray.states import RunState
from airflow_batch_provider.core.spec import JobSpec
from airflow_batch_provider.core.tunables import HOLDER_CHECK_S, LEASE_TIMEOUT_S, RESULTS_KEPT

log = logging.getLogger(__name__)



def _job_alive(job_id: str) -> bool:
    """Whether the Ray job (driver) ``job_id`` is still running, as the GCS knows it."""
    try:
        from ray._private.state import state

        for job in state.job_table():
            if job.get("JobID") == job_id:
                return not job.get("IsDead", False)
    except Exception:  # an unknown answer keeps the lease: it still expires after LEASE_TIMEOUT_S
        return True
    return True


@ray.remote(concurrency_groups={"compute": 1, "control": 8, "lease": 64})
class Replica:
    """A model replica: one predictor instance, one shard at a time, control calls alongside.

    ``reserve`` calls, which may block while they wait for the replica, have a thread group of
    their own ("lease"), so that waiting shard tasks never hold up ``status`` or ``wait``."""

    def __init__(self, predictor: str, predictor_kwargs: dict[str, Any], idle_timeout_s: float, secrets: dict[str, str] | None = None):
        from airflow_batch_provider.core.execution.allocator import keep_freed_memory
        from airflow_batch_provider.core.execution.batches import build_predictor
        from airflow_batch_provider.core.redaction import Redactor

        # Before the model loads: this process serves only this replica, shard after shard.
        self.keeps_freed_memory = keep_freed_memory()
        started = time.perf_counter()
        self._secrets = secrets  # Ray resolved the ref; each run's runner redacts errors with them
        self._redactor = Redactor((secrets or {}).values())
        # A predictor that cannot be built (its module not importable on this node, say) is kept
        # as this replica's answer to ``reserve`` rather than raised: an actor whose constructor
        # raises dies with its error flattened into text, and the pool would only see replicas
        # that vanish. The caller raises it (the core's own error, type and message) and kills
        # this replica.
        self.predictor: Any = None
        self.load_error: BaseException | None = None
        try:
            self.predictor = build_predictor(predictor, {**predictor_kwargs, **(secrets or {})})
        except Exception as err:
            self.load_error = self._redactor.error(err) if self._redactor.names_a_secret(err) else err
            log.error("Replica could not load predictor %s: %s: %s", predictor, type(err).__name__, self._redactor.text(str(err)))
        self.load_seconds = time.perf_counter() - started
        self.shards_run = 0
        self._lock = threading.Lock()
        self._lease: tuple[str, float, str | None, str | None] | None = None  # token, since, holder's Ray job id, ask id
        self._retired = False
        self._cancelled: set[str] = set()  # tokens whose calls must stop (or never start)
        self._running: str | None = None
        self._running_attempt: dict[str, Any] = {}
        self._progress: dict[str, Any] = {}
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
        from airflow_batch_provider.core.execution.runner import ShardRunner

        token = attempt["token"]
        planned = [Shard.from_dict(shard) for shard in shards]
        progress = {"rows_done": 0, "rows_total": sum(s.rows for s in planned), "started": time.monotonic()}
        with self._lock:
            self._running, self._lease, self._running_attempt = token, None, attempt
            self._progress = progress
            self._last_active = time.monotonic()

        def on_rows(rows: int, base: int) -> None:
            progress.update(rows_done=base + rows)
            self._stop_if_cancelled(token)

        try:
            runner = ShardRunner(JobSpec.from_dict(spec), storage_options, predictor=self.predictor, secrets=self._secrets)
            results = []
            done_before = 0
            for shard in planned:
                self._stop_if_cancelled(token)
                result = runner.run(shard, attempt, on_rows=lambda rows, base=done_before: on_rows(rows, base))
                done_before += shard.rows
                progress["rows_done"] = done_before
                load_seconds = self.load_seconds if self.shards_run == 0 else 0.0
                self.shards_run += 1
                results.append(dataclasses.replace(result, worker_pid=os.getpid(), model_load_seconds=load_seconds).to_dict())
            self._finish(token, {"state": RunState.SUCCEEDED, "results": results})
            return results
        except BaseException as err:
            self._finish(token, {"state": RunState.FAILED, "error": self._redactor.text(f"{type(err).__name__}: {err}"),
                                 "retryable": is_retryable(err)})
            if self._redactor.names_a_secret(err):
                raise self._redactor.error(err) from None
            raise

    def _stop_if_cancelled(self, token: str) -> None:
        """Called between batches: a cancelled call stops here (its staged part is dropped)."""
        if token in self._cancelled:
            raise ShardCancelledError(f"the Ray call {token} was cancelled by its shard task (on_kill or execution_timeout)")

    def _finish(self, token: str, outcome: dict[str, Any]) -> None:
        with self._lock:
            self._cancelled.discard(token)
            self._results[token] = outcome
            while len(self._results) > RESULTS_KEPT:
                self._results.popitem(last=False)
            self._running, self._running_attempt = None, {}
            self._last_active = time.monotonic()
            self._done.notify_all()

    # -- control (answered while a shard computes) ------------------------------------
    @ray.method(concurrency_group="lease")
    def reserve(
        self, token: str, wait_s: float = 0.0, holder: str | None = None, not_after: float | None = None, ask: str | None = None
    ) -> bool:
        """Lease this replica to one shard task; False while another holds or uses it.

        With ``wait_s`` > 0 a busy replica answers as soon as it is free (its shard ended, or
        the lease holding it was released, expired or lost its holder), or False after
        ``wait_s``. ``holder`` is the caller's Ray job id. A call that starts after
        ``not_after`` (wall clock) answers False at once: its caller stopped waiting for the
        answer (the replica was still loading), and a lease nobody knows of must not be granted.
        ``ask`` names this request, so that ``release`` can give back exactly the lease it got.
        """
        if self.load_error is not None:
            raise self.load_error
        if not_after is not None and time.time() > not_after:
            return False
        deadline = time.monotonic() + wait_s
        with self._lock:
            while True:
                now = time.monotonic()
                if self._retired:
                    return False
                if self._running is None and self._lease_free_for(token, now):
                    self._lease = (token, now, holder, ask)
                    self._last_active = now
                    return True
                wake = deadline - now
                if wake <= 0:
                    return False
                if self._running is None and self._lease is not None:  # held by a lease: it may expire, or its holder die, first
                    wake = min(wake, self._lease[1] + LEASE_TIMEOUT_S - now + 0.01, HOLDER_CHECK_S)
                self._done.wait(timeout=wake)

    def _lease_free_for(self, token: str, now: float) -> bool:
        """No lease, our own, an expired one, or one whose holder's Ray job has ended."""
        lease = self._lease
        if lease is None or lease[0] == token or now - lease[1] > LEASE_TIMEOUT_S:
            return True
        holder = lease[2]
        if holder and not _job_alive(holder):
            log.info("The lease of %s is freed: its holder (Ray job %s) is gone", lease[0], holder)
            self._lease = None
            return True
        return False

    @ray.method(concurrency_group="control")
    def release(self, token: str, ask: str | None = None) -> None:
        """Give back the lease of ``token`` (only the one ``ask`` got, when named)."""
        with self._lock:
            if self._lease and self._lease[0] == token and (ask is None or self._lease[3] == ask):
                self._lease = None
                self._done.notify_all()

    @ray.method(concurrency_group="control")
    def cancel(self, token: str) -> str:
        """Stop the call of ``token``: a lease is given back; a running call stops at its next
        batch (it commits nothing). Returns the state the call was in."""
        with self._lock:
            state = self._state_of(token)["state"]
            if token not in self._results:
                self._cancelled.add(token)  # a call not started yet will not start either
            if self._lease and self._lease[0] == token:
                self._lease = None
                self._done.notify_all()
            return str(state)

    @ray.method(concurrency_group="control")
    def retire(self) -> bool:
        """Agree to be stopped only when idle: True (and no lease is granted from now on) when no
        call runs and no live lease holds this replica; False while it serves a shard."""
        with self._lock:
            if self._running is not None or not self._lease_free_for("", time.monotonic()):
                return False
            self._retired = True
            return True

    @ray.method(concurrency_group="control")
    def status(self, token: str) -> dict[str, Any]:
        with self._lock:
            return self._state_of(token)

    @ray.method(concurrency_group="control")
    def wait(self, token: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._state_of(token)["state"] == RunState.RUNNING and time.monotonic() < deadline:
                self._done.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            return self._state_of(token)

    def _state_of(self, token: str) -> dict[str, Any]:
        """RUNNING also covers a call leased to ``token`` that has not started yet: Ray runs
        control calls on their own threads, so ``status`` can be answered before the
        ``run_shards`` call it follows is picked up (on a busy machine, for a while); reporting
        that as UNKNOWN would fail the shard task. A lease whose call never came expires."""
        if self._running == token:
            progress = self._progress
            return {"state": RunState.RUNNING, "progress": {"rows_done": progress["rows_done"], "rows_total": progress["rows_total"],
                                                           "seconds": time.monotonic() - progress["started"]}}
        if token in self._results:
            return self._results[token]
        if self._lease is not None and self._lease[0] == token and time.monotonic() - self._lease[1] <= LEASE_TIMEOUT_S:
            return {"state": RunState.RUNNING, "queued": True}
        return {"state": RunState.UNKNOWN}

    @ray.method(concurrency_group="control")
    def running_for(self, key: str) -> str | None:
        """The token of the call running now for attempt ``key`` (shared by every try of one
        unit of work, see ``new_attempt``), or None."""
        with self._lock:
            attempt = self._running_attempt
            if key and attempt.get("key") == key:
                return attempt["token"]
            return None

    @ray.method(concurrency_group="control")
    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "load_seconds": self.load_seconds, "shards_run": self.shards_run,
                "keeps_freed_memory": self.keeps_freed_memory,
                # the GPUs Ray gave this replica (it sets CUDA_VISIBLE_DEVICES to them)
                "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()]}

    def _reap_when_idle(self) -> None:
        while True:
            time.sleep(min(10.0, self._idle_timeout_s / 4))
            with self._lock:
                idle = self._running is None and time.monotonic() - self._last_active > self._idle_timeout_s
            if idle:
                log.info("Replica idle for %.0f s: exiting to free its resources", self._idle_timeout_s)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return
