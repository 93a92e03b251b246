"""The three operators of a batch inference job: plan, shard (mapped), finalize.

They are thin: each turns the templated spec dict back into a ``BatchSpec``, resolves the
storage connection, and calls the core through its one entry point
(``airflow_batch_provider.core.api``). ``batch_inference()`` in ``task_group.py`` wires them
into a task group; use them directly only for unusual layouts.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, ResumableJobMixin, conf

from airflow_batch_provider.core import api
from airflow_batch_provider.exceptions import BatchInferenceException, BatchInferenceFailure, task_error
from airflow_batch_provider.hooks.predictor_secrets import resolve_predictor_secrets
from airflow_batch_provider.hooks.ray import RayHook
from airflow_batch_provider.hooks.storage import storage_options_for
from airflow_batch_provider.links.sink_status import SinkStatusLink
from airflow_batch_provider.spec import BatchSpec
from airflow_batch_provider.triggers.shard import RayShardTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

#: status of a stored Ray call that belongs to another work unit: neither running nor succeeded
OTHER_UNIT = "OTHER_UNIT"

#: how long after ``execution_timeout`` Airflow itself fails a deferred shard task whose trigger
#: (which cancels the Ray call at ``execution_timeout``) has not answered.
DEFERRED_TIMEOUT_GRACE_S = 60.0

__all__ = ["BatchInferenceException", "BatchInferenceFailure", "BatchShardOperator", "FinalizeBatchOperator", "PlanBatchOperator", "work_units"]


def _spec_dict(spec: BatchSpec | dict[str, Any]) -> dict[str, Any]:
    return spec.to_dict() if isinstance(spec, BatchSpec) else dict(spec)


def work_units(shards: list[api.Shard], max_tasks: int, shards_per_task: int = 1) -> list[dict[str, Any]]:
    """The mapped tasks of the pending shards: ``shards_per_task`` shards each (in plan order),
    or more where that would make more than ``max_tasks`` tasks (Airflow's
    ``[core] max_map_length``), so that the mapping always fits.

    Each unit is JSON-able (it travels through XCom) and carries the ``label`` the UI shows
    for the mapped task (``map_index_template``). A unit's shards run one after another on one
    replica, each committed on its own: how many shards a task holds changes how many tasks
    Airflow schedules, not what a crash can lose.
    """
    if not shards:
        return []
    per_unit = max(shards_per_task, math.ceil(len(shards) / max(1, max_tasks)))
    units = []
    for offset in range(0, len(shards), per_unit):
        group = shards[offset : offset + per_unit]
        first, last = group[0].description, group[-1].description
        label = first if len(group) == 1 else f"{len(group)} shards: {first} .. {last}"
        units.append({"label": label, "shards": [s.to_dict() for s in group]})
    return units


def reset_key(ti: Any) -> str:
    """What every try and every clear of one plan task in one DAG run shares: resume=False
    starts fresh once per key, so a retried plan keeps what its run committed."""
    return f"{ti.dag_id}/{ti.run_id}/{ti.task_id}"


def unit_id(work_unit: dict[str, Any]) -> str:
    """Names a work unit by its shards. A cleared DAG run re-runs the plan, which maps only
    the shards still pending: a map index can then stand for other shards than before."""
    shard_ids = ",".join(s["shard_id"] for s in work_unit["shards"])
    return hashlib.sha256(shard_ids.encode()).hexdigest()[:16]


def attempt_key(ti: Any, unit: str = "") -> str:
    """What every try of one mapped task instance on one work unit shares: how a retry finds
    an earlier try's call (never the call of other shards mapped to the same index before)."""
    key = f"{ti.dag_id}/{ti.run_id}/{ti.task_id}/{ti.map_index}"
    return f"{key}/{unit}" if unit else key


class _SpecOperator(BaseOperator):
    """Holds the spec as a templated dict (paths may use ``{{ ds }}`` and friends)."""

    template_fields: Sequence[str] = ("spec",)
    operator_extra_links = (SinkStatusLink(),)

    def __init__(self, *, spec: BatchSpec | dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = _spec_dict(spec)

    @cached_property
    def batch_spec(self) -> BatchSpec:
        try:
            return BatchSpec.from_dict(self.spec)
        except api.BatchError as err:
            raise task_error(str(err), retryable=api.is_retryable(err)) from err

    @cached_property
    def core_spec(self) -> api.BatchSpec:
        return self.batch_spec.core()

    @cached_property
    def storage_options(self) -> dict[str, Any] | None:
        return storage_options_for(self.batch_spec)


class PlanBatchOperator(_SpecOperator):
    """List the input once, persist the plan, and return the work units still to compute.

    Returns a list of ``{"label", "shards"}`` dicts, one per mapped shard task. Committed
    shards are left out; with more pending shards than ``[core] max_map_length``, several
    shards share one task so that the mapping always fits.

    :param ray_conn_id: ``ray`` connection, for starting the model replicas ahead.
    :param shards_per_task: pending shards per mapped task (at least; more where the tasks
        would exceed ``max_map_length``). Each shard still commits on its own.
    :param start_workers: when shards are pending, start up to this many of the model's Ray
        replicas now, without waiting, so the model loads while Airflow schedules the shard
        tasks. ``None``: as many as the pending tasks and the cluster allow (what shard tasks
        running all at once would create); ``0``: none. Keep it at the shard tasks'
        concurrency cap, or replicas beyond it hold their CPUs/GPUs unused until ``finalize``
        releases them. Best effort: if Ray cannot be reached, a warning is logged and the
        shard tasks start the replicas instead; if no node of the cluster has the resources a
        replica asks for, the plan fails at once, naming them.
    """

    template_fields: Sequence[str] = ("spec", "ray_conn_id")
    ui_color = "#e8f4fd"

    def __init__(
        self,
        *,
        ray_conn_id: str = RayHook.default_conn_name,
        start_workers: int | None = None,
        shards_per_task: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(shards_per_task, bool) or not isinstance(shards_per_task, int) or shards_per_task < 1:
            raise ValueError(f"shards_per_task must be an integer >= 1, got {shards_per_task!r}")
        self.ray_conn_id = ray_conn_id
        self.start_workers = start_workers
        self.shards_per_task = shards_per_task

    def execute(self, context: Context) -> list[dict[str, Any]]:
        started = time.time()
        spec = self.core_spec
        try:
            job = api.plan(spec, self.storage_options, reset_key=None if spec.resume else reset_key(context["ti"]))
        except api.BatchError as err:
            raise task_error(str(err), retryable=api.is_retryable(err)) from err
        for note in job.notes:
            self.log.warning("%s", note)
        units = work_units(job.pending, conf.getint("core", "max_map_length", fallback=1024), self.shards_per_task)
        for unit in units:
            unit["plan_id"] = job.plan.plan_id  # a shard of a plan replaced meanwhile never commits into the new one
        self.log.info(
            "Plan for %s: %s shards (%s rows), %s already committed, %s to compute in %s mapped tasks; plan %s",
            spec.sink_root,
            len(job.plan.shards),
            job.plan.total_rows,
            job.committed,
            len(job.pending),
            len(units),
            "written" if job.plan_written else "reused",
        )
        self.log.info("%s", api.format_event(
            api.EventKind.PLAN, sink=spec.sink_root, shards=len(job.plan.shards), rows=job.plan.total_rows, committed=job.committed,
            pending=len(job.pending), tasks=len(units), plan_written=job.plan_written,
        ))
        context["ti"].xcom_push(
            key="summary",
            value={
                "started_at": started,
                "shards": len(job.plan.shards),
                "rows": job.plan.total_rows,
                "committed": job.committed,
                "pending": len(job.pending),
                "pending_rows": sum(s.rows for s in job.pending),
            },
        )
        wanted = len(units) if self.start_workers is None else min(len(units), self.start_workers)
        if wanted > 0:
            self._start_workers(spec, wanted)
        return units

    def _start_workers(self, spec: api.BatchSpec, wanted: int) -> None:
        try:
            RayHook(ray_conn_id=self.ray_conn_id).get_conn()
            names = api.ReplicaPool(spec, secrets=resolve_predictor_secrets(spec.predictor_secrets)).start(wanted)
        except api.ResourcesUnavailableError as err:  # no shard could run either: fail now, naming the resources
            raise task_error(str(err), retryable=api.is_retryable(err)) from err
        except Exception as err:  # an optimisation only: the shard tasks connect and report
            self.log.warning("Could not start Ray workers ahead (%s: %s); the shard tasks will start them", type(err).__name__, err)
            return
        self.log.info("Started %s Ray worker(s) ahead, loading the model: %s", len(names), ", ".join(names))


class BatchShardOperator(ResumableJobMixin, _SpecOperator):
    """Compute one work unit (usually one shard) on a Ray model replica and commit its part.

    The Ray call is recorded in ``task_state_store`` (``ResumableJobMixin``, on both paths): a
    retry whose Ray work is still running waits for it instead of starting it again, and a
    retry of a shard that got committed meanwhile returns at once. A try that died between
    submitting and recording is covered too: its retry asks the model's replicas for work of
    this task instance.

    :param spec: the ``BatchSpec`` (or its dict).
    :param work_unit: one item of the plan task's output (``{"label", "shards"}``).
    :param ray_conn_id: ``ray`` connection; see :class:`~airflow_batch_provider.hooks.ray.RayHook`.
    :param deferrable: submit the Ray work, then defer to
        :class:`~airflow_batch_provider.triggers.shard.RayShardTrigger` while Ray computes,
        so the task holds no worker slot (needs ``airflow triggerer``). Default:
        ``[operators] default_deferrable``.
    :param poll_interval: seconds between the trigger's status checks (deferrable only).
    :param progress_interval: seconds between the progress lines (rows done, rows/s, time
        left) the task (or, deferred, its trigger) writes to the task log while Ray computes.
    :param lease_timeout: seconds a shard task waits for a free model replica before it
        fails (None: as long as the task may run). With more shard tasks than replicas, tasks
        queue on the replicas, so keep it above the time a few shards take.

    Deadlines: ``execution_timeout`` and stopping the task (``on_kill``) cancel the Ray call
    and free its replica (deferred, the trigger cancels it at ``execution_timeout``). A
    replica that no node of the cluster can hold fails the task at once, naming the resources.
    A call lost with its replica or node is submitted again on another replica within the
    same try, up to the spec's ``max_retries`` times.
    """

    template_fields: Sequence[str] = ("spec", "work_unit", "ray_conn_id")
    external_id_key = "ray_shard_call"
    ui_color = "#fdf1e8"
    #: seconds to wait, after submitting, for the Ray replica to report the call as started.
    start_timeout_s: float = 60.0

    def __init__(
        self,
        *,
        work_unit: dict[str, Any],
        ray_conn_id: str = RayHook.default_conn_name,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 5.0,
        progress_interval: float = 30.0,
        lease_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.lease_timeout = lease_timeout
        self.work_unit = work_unit
        self.ray_conn_id = ray_conn_id
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.progress_interval = progress_interval
        self._results: list[dict[str, Any]] | None = None
        self._work: dict[str, str] | None = None  # the Ray call this process follows, for on_kill

    @cached_property
    def shards(self) -> list[api.Shard]:
        return [api.Shard.from_dict(s) for s in self.work_unit["shards"]]

    @cached_property
    def replicas(self) -> api.ReplicaPool:
        return api.ReplicaPool(self.core_spec, secrets=resolve_predictor_secrets(self.core_spec.predictor_secrets))

    @property
    def label(self) -> str:
        return self.work_unit["label"]

    def execute(self, context: Context) -> dict[str, Any]:
        started = time.perf_counter()
        RayHook(ray_conn_id=self.ray_conn_id).get_conn()
        results = self.execute_resumable(context)
        return self._summarise(results, None if self.deferrable else time.perf_counter() - started)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger fired: validate its event, return the shard summary. A call
        the trigger found lost (replica or node gone) is submitted again and deferred anew."""
        if not isinstance(event, dict) or "status" not in event:
            raise BatchInferenceException(
                f"shard(s) {self.label}: the trigger returned no valid event ({event!r}); retrying computes what is not committed"
            )
        if event["status"] == "lost":
            return self._resume_lost(event, context)
        if event["status"] != "success":
            raise task_error(event.get("message") or f"shard(s) {self.label} failed: {event!r}", retryable=event.get("retryable", True))
        results = event.get("results")
        if not isinstance(results, list):
            raise BatchInferenceException(f"shard(s) {self.label}: success event without results ({event!r})")
        self.log.info("Ray work %s finished", event.get("token"))
        return self._summarise(results)

    def _resume_lost(self, event: dict[str, Any], context: Context) -> dict[str, Any]:
        """The deferred twin of the sync path's resubmission: same try, another replica."""
        self.log.warning("%s", event.get("message"))
        RayHook(ray_conn_id=self.ray_conn_id).get_conn()
        resubmits = int(event.get("resubmits") or 0) + 1
        lost = {"worker": event.get("worker", ""), "token": event.get("token", "")}
        external_id = self._resubmit_lost(lost, resubmits, context)
        self._defer_unless_done(external_id, context, resubmits=resubmits)
        return self._summarise(self.get_job_result(external_id, context))

    # -- ResumableJobMixin ---------------------------------------------------------------
    def submit_job(self, context: Context) -> dict[str, str]:
        ti = context["ti"]
        unit = unit_id(self.work_unit)
        key = attempt_key(ti, unit)
        if ti.try_number > 1 and (running := self.replicas.find_running(key)):
            # An earlier try submitted this work but died before task_state_store held its id.
            self.log.info("Reconnecting to running Ray work %s of an earlier try (its id was never stored)", running)
            return {**running, "unit": unit}
        attempt = api.new_attempt(key, try_number=ti.try_number, plan_id=self.work_unit.get("plan_id"))
        try:
            work = self.replicas.submit(self.shards, attempt, self.storage_options, lease_timeout_s=self.lease_timeout)
        except api.BatchError as err:
            raise task_error(f"shard(s) {self.label}: {err}", retryable=api.is_retryable(err)) from err
        self.log.info("Shard(s) %s submitted to Ray worker %s (attempt %s)", self.label, work["worker"], work["token"])
        return {**work, "unit": unit}

    def get_job_status(self, external_id: Any, context: Context) -> str:
        stored_unit = external_id.get("unit") if isinstance(external_id, dict) else None
        if stored_unit is not None and stored_unit != unit_id(self.work_unit):
            self.log.warning(
                "The stored Ray work %s computed other shards than %s (the plan ran again in this DAG run and "
                "mapped this index anew); submitting this unit's shards", external_id, self.label,
            )
            return OTHER_UNIT
        outcome = self.replicas.status(external_id)
        self._queued = bool(outcome.get("queued"))  # leased to this call, which the replica has not taken up yet
        return outcome["state"]

    def is_job_active(self, status: str) -> bool:
        return status == api.RunState.RUNNING

    def is_job_succeeded(self, status: str) -> bool:
        return status == api.RunState.SUCCEEDED

    def poll_until_complete(self, external_id: Any, context: Context) -> list[dict[str, Any]]:
        """Sync: block until the Ray work ends. Deferrable: check once, then defer to the trigger.

        Returns the shard results (``execute_resumable`` hands them on when it reconnected)."""
        if self.deferrable:
            self._defer_unless_done(external_id, context)
            return self.get_job_result(external_id, context)
        resubmits = 0
        while True:
            results = self._wait_cancelling_on_stop(external_id)
            if results is not None:
                self._results = results
                return results
            resubmits += 1
            external_id = self._resubmit_lost(external_id, resubmits, context)

    def _wait_cancelling_on_stop(self, external_id: dict[str, str]) -> list[dict[str, Any]] | None:
        """``ReplicaPool.result`` of the call; if the wait is interrupted (execution_timeout's
        AirflowTaskTimeout, the task being stopped), the Ray call is cancelled first."""
        self._work = external_id
        try:
            results = self.replicas.result(external_id, on_progress=self._log_progress, every_s=self.progress_interval)
        except api.BatchError as err:  # the core's error raised on the replica, or a RayWorkError
            raise task_error(f"shard(s) {self.label}: {err}", retryable=api.is_retryable(err)) from err
        except BaseException as err:
            self._cancel_work()
            if isinstance(err, SystemError) and err.__cause__ is not None:
                raise err.__cause__ from None  # raised by a signal handler while Ray's C code waited: Ray wraps it
            raise
        self._work = None
        return results

    def _resubmit_lost(self, lost: dict[str, str], resubmits: int, context: Context) -> dict[str, str]:
        """A call lost with its replica or node: submit the shards again (another replica, same
        try), at most the spec's ``max_retries`` times, and record the new call."""
        max_retries = self.core_spec.max_retries
        if resubmits > max_retries:
            raise BatchInferenceException(
                f"shard(s) {self.label}: the Ray work was lost {resubmits} times (replica or node gone), more than the "
                f"spec's max_retries={max_retries}; a task retry computes what is not committed"
            )
        self.log.warning("Ray work %s is gone (replica or its node lost); computing what is not committed on another "
                         "replica (%s of max_retries=%s)", lost, resubmits, max_retries)
        external_id = self.submit_job(context)
        if (store := context.get("task_state_store")) is not None:
            store.set(self.external_id_key, external_id)
        return external_id

    def on_kill(self) -> None:
        """The task is being stopped (marked failed, cleared, or past ``execution_timeout``):
        stop its Ray call too, so the replica is free for other shards at once."""
        self._cancel_work()

    def _cancel_work(self) -> None:
        work, self._work = self._work, None
        if work is None:
            return
        try:
            state = self.replicas.cancel(work)
        except Exception as err:  # the task stops anyway; the replica ends the call when it can
            self.log.warning("Could not cancel Ray work %s: %s: %s", work, type(err).__name__, err)
            return
        self.log.warning("Cancelled Ray work %s of shard(s) %s (it was %s); nothing of it was committed", work["token"], self.label, state)

    def _log_progress(self, progress: api.Progress) -> None:
        self.log.info("Shard(s) %s: %s", self.label, progress.describe())
        self.log.info("%s", api.format_event(
            api.EventKind.PROGRESS, label=self.label, rows_done=progress.rows_done, rows_total=progress.rows_total, seconds=progress.seconds,
        ))

    def get_job_result(self, external_id: Any, context: Context) -> list[dict[str, Any]]:
        if self._results is None:
            self._results = self.replicas.status(external_id).get("results", [])
        return self._results

    # -- deferrable path -------------------------------------------------------------------
    def _defer_unless_done(self, external_id: dict[str, str], context: Context, resubmits: int = 0) -> None:
        """The call was just submitted or found running: return if it has already ended well,
        raise if it failed, else defer to the trigger while Ray computes. ``resubmits``: how
        often this try already submitted the work again after losing it."""
        status = self._wait_started(external_id, context)
        if status == api.RunState.SUCCEEDED:
            return
        if status == api.RunState.FAILED:
            outcome = self.replicas.status(external_id)
            raise task_error(f"shard(s) {self.label} failed on Ray: {outcome.get('error')}", retryable=outcome.get("retryable", True))
        self.log.info("Deferring while Ray computes shard(s) %s (%s)", self.label, external_id)
        self.defer(
            trigger=RayShardTrigger(
                worker=external_id["worker"],
                token=external_id["token"],
                spec=self.spec,
                shards=self.work_unit["shards"],
                ray_conn_id=self.ray_conn_id,
                label=self.label,
                poll_interval=self.poll_interval,
                progress_interval=self.progress_interval,
                cancel_at=self._cancel_at(context),
                resubmits=resubmits,
            ),
            method_name="execute_complete",
            # Airflow's own deadline only fails the task; the trigger cancels the Ray call first.
            timeout=self.execution_timeout + timedelta(seconds=DEFERRED_TIMEOUT_GRACE_S) if self.execution_timeout else None,
        )

    def _cancel_at(self, context: Context) -> float | None:
        """When the trigger cancels the call: ``execution_timeout`` after this try started."""
        if not self.execution_timeout:
            return None
        start = getattr(context["ti"], "start_date", None)
        begun = start.timestamp() if start is not None else time.time()
        return begun + self.execution_timeout.total_seconds()

    def _wait_started(self, external_id: dict[str, str], context: Context) -> str:
        """Wait until the replica runs the submitted call (or reports its end), not only holds
        its lease. Until the replica's compute thread takes the call up, the lease is all that
        keeps the replica for it, and the lease lasts as long as its holder, this process's
        Ray job. Deferring ends the process: the replica, seeing its holder gone, would lease
        itself to another shard task, whose call would then wait behind this one unseen and
        be taken for lost (its shard computed twice)."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            self._queued = False
            status = self.get_job_status(external_id, context)
            started = status != api.RunState.UNKNOWN and not (status == api.RunState.RUNNING and self._queued)
            if started or time.monotonic() > deadline:
                return status
            time.sleep(0.1)

    def _summarise(self, results: list[dict[str, Any]], task_seconds: float | None = None) -> dict[str, Any]:
        """Log each shard's figures; ``task_seconds`` (sync path only) also gives the overhead."""
        for r in results:
            rate = r["rows_in"] / r["seconds"] if r["seconds"] else 0.0
            self.log.info(
                "Shard %s %s: %s rows in, %s rows out, %s rows rejected, %s bytes, %.2f s (model %.2f s, %.1f rows/s)",
                r["shard_id"], r["status"], r["rows_in"], r["rows_out"], r.get("rows_rejected", 0), r["bytes"], r["seconds"],
                r["model_seconds"], rate,
            )
            self.log.info("%s", api.format_event(
                api.EventKind.SHARD_DONE, shard_id=r["shard_id"], status=r["status"], rows_in=r["rows_in"], rows_out=r["rows_out"],
                rows_rejected=r.get("rows_rejected", 0), bytes=r["bytes"], seconds=r["seconds"], model_seconds=r["model_seconds"],
                model_load_seconds=r.get("model_load_seconds") or 0.0,
            ))
            if r.get("rows_rejected"):
                self.log.warning(
                    "Shard %s rejected %s rows (bad_rows='skip'): see %s", r["shard_id"], r["rows_rejected"],
                    api.rejected_path(self.core_spec, r["shard_id"]),
                )
            if r.get("model_load_seconds"):
                self.log.info("Ray worker %s loaded the model in %.2f s (once; later shards reuse it)", r.get("worker_pid"), r["model_load_seconds"])
            if r.get("note"):
                self.log.warning("%s", r["note"])
        model = sum(r["model_seconds"] for r in results)
        if task_seconds is not None:
            self.log.info("Shard task wall %.3f s, model %.3f s, overhead %.3f s", task_seconds, model, task_seconds - model)
            self.log.info("%s", api.format_event(
                api.EventKind.SHARD_TASK, task_seconds=task_seconds, model_seconds=model, overhead_seconds=task_seconds - model,
            ))
        return {
            "task_seconds": task_seconds,
            "shards": [r["shard_id"] for r in results],
            "computed": sum(r["status"] == "computed" for r in results),
            "rows_in": sum(r["rows_in"] for r in results),
            "rows_out": sum(r["rows_out"] for r in results),
            "rows_rejected": sum(r.get("rows_rejected", 0) for r in results),
            "seconds": sum(r["seconds"] for r in results),
            "model_seconds": sum(r["model_seconds"] for r in results),
        }


class FinalizeBatchOperator(_SpecOperator):
    """Check every planned shard is committed, write ``_SUCCESS``, emit the sink's asset event.

    :param plan_task_id: task id of the plan step (for the job's start time).
    :param release_workers: stop the model's Ray workers now rather than at their idle timeout.
    """

    ui_color = "#e9f7ec"

    def __init__(
        self, *, plan_task_id: str | None = None, ray_conn_id: str = RayHook.default_conn_name, release_workers: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.plan_task_id = plan_task_id
        self.ray_conn_id = ray_conn_id
        self.release_workers = release_workers

    def execute(self, context: Context) -> dict[str, Any]:
        summary = {}
        if self.plan_task_id:
            summary = context["ti"].xcom_pull(task_ids=self.plan_task_id, key="summary") or {}
        elapsed = time.time() - summary["started_at"] if "started_at" in summary else None
        try:
            manifest = api.finalize(self.core_spec, self.storage_options, elapsed_seconds=elapsed)
        except api.BatchError as err:
            raise task_error(str(err), retryable=api.is_retryable(err)) from err
        result = {k: manifest[k] for k in ("shards", "rows_in", "rows_out", "rows_rejected", "bytes", "sink", "spec_fingerprint")}
        result["computed_this_run"] = summary.get("pending")
        result["elapsed_seconds"] = elapsed
        if elapsed and summary.get("pending_rows"):
            result["rows_per_second"] = summary["pending_rows"] / elapsed
        self.log.info(
            "Batch complete: %s shards, %s rows in, %s rows out, %s rows rejected, %s bytes in %s (%s computed this run)",
            result["shards"], result["rows_in"], result["rows_out"], result["rows_rejected"], result["bytes"],
            self.core_spec.sink_root, summary.get("pending"),
        )
        self.log.info("%s", api.format_event(api.EventKind.RESULT, **result))
        if result["rows_rejected"]:
            self.log.warning("%s rows were rejected (bad_rows='skip'): they are in %s", result["rows_rejected"], manifest["rejected_dir"])
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = {k: v for k, v in result.items() if v is not None}
        if self.release_workers and summary.get("pending"):
            RayHook(ray_conn_id=self.ray_conn_id).get_conn()
            released = api.ReplicaPool(self.core_spec, secrets=resolve_predictor_secrets(self.core_spec.predictor_secrets)).shutdown()
            self.log.info("Released %s idle Ray worker(s) of this model (any serving a shard of another run keeps running)", released)
        return result
