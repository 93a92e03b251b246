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
from collections.abc import Callable, Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, BaseOperator, ResumableJobMixin, conf

from airflow_batch_provider.assets import partition_key
from airflow_batch_provider.core import api
from airflow_batch_provider.exceptions import BatchInferenceException, BatchInferenceFailure, task_error
from airflow_batch_provider.hooks.predictor_secrets import resolve_predictor_secrets
from airflow_batch_provider.hooks.ray import RayHook
from airflow_batch_provider.hooks.storage import storage_options_for
from airflow_batch_provider.links.sink_status import SinkStatusLink
from airflow_batch_provider.settings import tunables
from airflow_batch_provider.spec import BatchSpec
from airflow_batch_provider.triggers.shard import RayShardTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

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
    def core_spec(self) -> api.JobSpec:
        """The spec as the core runs it: the ``ray_batch`` connection's ``runtime_env`` (its extra's)
        applied when the spec sets none (the spec's own wins, whole). Plan, shard and finalize
        tasks all build it so, and the replicas are keyed by it: they all reach the same
        replicas. Not part of the fingerprint (see ``BatchSpec``). The trigger of a deferred
        shard task follows its call by the replica's name, and carries only the spec as written,
        so no ``env_vars`` value lands in the trigger's kwargs."""
        spec = self.batch_spec.core()
        if spec.runtime_env is not None:
            self.log.info("Replicas use the spec's runtime_env: %s", api.describe_runtime_env(spec.runtime_env))
            return spec
        hook = RayHook(ray_conn_id=getattr(self, "ray_conn_id", RayHook.default_conn_name))
        try:
            default = hook.get_runtime_env()
            effective = spec.with_runtime_env(default)
        except (ValueError, api.BatchError) as err:  # BatchSpecError is a ValueError too
            raise task_error(f"the runtime_env of the {hook.ray_conn_id!r} connection cannot be used: {err}", retryable=False) from err
        conn_id = hook.ray_conn_id  # the connection read (ray_default where it stood in for ray_batch_default)
        if effective is not spec:
            self.log.info("Replicas use the runtime_env of the %r connection: %s", conn_id, api.describe_runtime_env(effective.runtime_env))
        return effective

    @cached_property
    def storage_options(self) -> dict[str, Any] | None:
        return storage_options_for(self.batch_spec)

    @cached_property
    def settings(self) -> api.Tunables:
        """The deployment's ``[batch_inference]`` settings, read in the task process."""
        return tunables()

    @cached_property
    def replicas(self) -> api.ReplicaPool:
        """The model's replicas on the Ray cluster this process is connected to."""
        return api.ReplicaPool(
            self.core_spec, secrets=resolve_predictor_secrets(self.core_spec.predictor_secrets),
            idle_timeout_s=self.settings.replica_idle_timeout_s, cancel_grace_s=self.settings.cancel_grace_s,
            node_wait_timeout_s=self.settings.node_wait_timeout_s,
        )


class PlanBatchOperator(_SpecOperator):
    """List the input once, persist the plan, and return the work units still to compute.

    Returns a list of ``{"label", "shards"}`` dicts, one per mapped shard task. Committed
    shards are left out; with more pending shards than ``[core] max_map_length``, several
    shards share one task so that the mapping always fits.

    :param ray_conn_id: ``ray_batch`` connection, for starting the model replicas ahead.
    :param shards_per_task: pending shards per mapped task (at least; more where the tasks
        would exceed ``max_map_length``). Each shard still commits on its own.
    :param start_replicas: when shards are pending, start up to this many of the model's
        replicas now, without waiting, so the model loads while Airflow schedules the shard
        tasks. ``None``: as many as the pending tasks and the cluster allow (what shard tasks
        running all at once would create); ``0``: none. Keep it at the shard tasks'
        concurrency cap, or replicas beyond it hold their CPUs/GPUs unused until ``finalize``
        releases them. Best effort: if Ray cannot be reached, a warning is logged and the
        shard tasks start the replicas instead; if no node of the cluster has the resources a
        replica asks for, the plan fails at once, naming them. (Formerly ``start_workers``,
        still accepted with a DeprecationWarning.)
    """

    template_fields: Sequence[str] = ("spec", "ray_conn_id")
    ui_color = "#e8f4fd"

    @api.renamed_keywords(start_workers="start_replicas")
    def __init__(
        self,
        *,
        ray_conn_id: str = RayHook.default_conn_name,
        start_replicas: int | None = None,
        shards_per_task: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(shards_per_task, bool) or not isinstance(shards_per_task, int) or shards_per_task < 1:
            raise ValueError(f"shards_per_task must be an integer >= 1, got {shards_per_task!r}")
        self.ray_conn_id = ray_conn_id
        self.start_replicas = start_replicas
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
        wanted = len(units) if self.start_replicas is None else min(len(units), self.start_replicas)
        if wanted > 0:
            self._start_replicas(spec, wanted)
        return units

    def _start_replicas(self, spec: api.JobSpec, wanted: int) -> None:
        try:
            RayHook(ray_conn_id=self.ray_conn_id).get_conn()
            names = self.replicas.start(wanted)
        except api.ResourcesUnavailableError as err:  # no shard could run either: fail now, naming the resources
            raise task_error(str(err), retryable=api.is_retryable(err)) from err
        except Exception as err:  # an optimisation only: the shard tasks connect and report
            self.log.warning("Could not start replicas ahead (%s: %s); the shard tasks will start them", type(err).__name__, err)
            return
        self.log.info("Started %s replica(s) ahead, loading the model: %s", len(names), ", ".join(names))


class BatchShardOperator(ResumableJobMixin, _SpecOperator):
    """Compute one work unit (usually one shard) on a Ray model replica and commit its part.

    The Ray call (:class:`~airflow_batch_provider.core.api.ShardCall`, which this task, its
    deferred twin and the trigger all drive) is recorded in ``task_state_store``
    (``ResumableJobMixin``, on both paths): a retry whose Ray work is still running waits for it
    instead of starting it again, and a retry of a shard that got committed meanwhile returns at
    once. A try that died between submitting and recording is covered too: its retry asks the
    model's replicas for work of this task instance.

    :param spec: the ``BatchSpec`` (or its dict).
    :param work_unit: one item of the plan task's output (``{"label", "shards"}``).
    :param ray_conn_id: ``ray_batch`` connection; see :class:`~airflow_batch_provider.hooks.ray.RayHook`.
    :param deferrable: submit the Ray work, then defer to
        :class:`~airflow_batch_provider.triggers.shard.RayShardTrigger` while Ray computes,
        so the task holds no worker slot (needs ``airflow triggerer``). Default:
        ``[operators] default_deferrable``.
    :param poll_interval: seconds between the trigger's status checks (deferrable only).
    :param progress_interval: seconds between the progress lines (rows done, rows/s, time
        left) the task (or, deferred, its trigger) writes to the task log while Ray computes.
    :param lease_timeout: seconds a shard task waits for a free model replica before it
        fails (None: ``[batch_inference] lease_timeout_s``, by default as long as the task may
        run). With more shard tasks than replicas, tasks queue on the replicas, so keep it
        above the time a few shards take.

    Deadlines: ``execution_timeout`` and stopping the task (``on_kill``) cancel the Ray call
    and free its replica (deferred, the trigger cancels it at ``execution_timeout``). A
    replica that no node of the cluster can hold fails the task at once, naming the resources.
    A call lost with its replica or node is submitted again on another replica within the
    same try, up to the spec's ``max_retries`` times.
    """

    template_fields: Sequence[str] = ("spec", "work_unit", "ray_conn_id")
    external_id_key = "ray_shard_call"
    ui_color = "#fdf1e8"

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
        self._call: api.ShardCall | None = None  # built on first use in a try (it needs the task instance)

    @property
    def label(self) -> str:
        return self.work_unit["label"]

    def call(self, context: Context) -> api.ShardCall:
        """This try's :class:`~airflow_batch_provider.core.api.ShardCall` of the work unit."""
        if self._call is None:
            ti = context["ti"]
            unit = unit_id(self.work_unit)
            self._call = api.ShardCall(
                self.replicas, self.work_unit["shards"], unit=unit, label=self.label, key=attempt_key(ti, unit), try_number=ti.try_number,
                max_retries=self.core_spec.max_retries, plan_id=self.work_unit.get("plan_id"),
                storage_options=self.storage_options, lease_timeout_s=self.lease_timeout if self.lease_timeout is not None else self.settings.lease_timeout_s, log=self.log,
            )
        return self._call

    def execute(self, context: Context) -> dict[str, Any]:
        started = time.perf_counter()
        RayHook(ray_conn_id=self.ray_conn_id).get_conn()
        results = self.execute_resumable(context)
        return self._summarise(results, None if self.deferrable else time.perf_counter() - started)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger fired: validate its event, return the shard summary. A call
        the trigger found lost (replica or node gone) is submitted again and deferred anew."""
        try:
            end = api.CallEvent.from_dict(event)
        except ValueError as err:
            raise BatchInferenceException(
                f"shard(s) {self.label}: the trigger returned no valid event ({err}); retrying computes what is not committed"
            ) from None
        if end.status == api.CallEnd.ERROR:
            raise task_error(end.message or f"shard(s) {self.label} failed: {event!r}", retryable=end.retryable)
        if end.status == api.CallEnd.LOST:
            self.log.warning("%s", end.message)
            RayHook(ray_conn_id=self.ray_conn_id).get_conn()
            resubmits = end.resubmits + 1
            work = self._guarded(lambda: self.call(context).resubmit(end.work, resubmits))
            self._record(context, work)
            self._defer_unless_done(work, context, resubmits=resubmits)
            return self._summarise(self.call(context).results_of(work))
        self.log.info("Ray work %s finished", end.work.token)
        return self._summarise(end.results)

    # -- ResumableJobMixin: the stored id is the WorkId's JSON form -------------------------
    def submit_job(self, context: Context) -> dict[str, str]:
        return self._guarded(lambda: self.call(context).submit()).to_dict()

    def get_job_status(self, external_id: Any, context: Context) -> str:
        work = self.call(context).adopt(external_id)
        return str(self.call(context).outcome(work).state if work else api.RunState.UNKNOWN)

    def is_job_active(self, status: str) -> bool:
        return status == api.RunState.RUNNING

    def is_job_succeeded(self, status: str) -> bool:
        return status == api.RunState.SUCCEEDED

    def poll_until_complete(self, external_id: Any, context: Context) -> list[api.ShardResult]:
        """Sync: block until the Ray work ends. Deferrable: check once, then defer to the trigger."""
        work = api.WorkId.from_dict(external_id)
        if self.deferrable:
            self._defer_unless_done(work, context)
            return self.call(context).results_of(work)
        return self._guarded(lambda: self.call(context).follow(
            work, on_progress=self._log_progress, every_s=self.progress_interval, on_resubmit=lambda new: self._record(context, new),
        ))

    def get_job_result(self, external_id: Any, context: Context) -> list[api.ShardResult]:
        return self.call(context).results_of(api.WorkId.from_dict(external_id))

    def on_kill(self) -> None:
        """The task is being stopped (marked failed, cleared, or past ``execution_timeout``):
        stop its Ray call too, so the replica is free for other shards at once."""
        if self._call is not None:
            self._call.cancel_followed()

    def _record(self, context: Context, work: api.WorkId) -> None:
        """Keep the call a retry must find (a resubmitted call replaces the lost one)."""
        if (store := context.get("task_state_store")) is not None:
            store.set(self.external_id_key, work.to_dict())

    def _guarded(self, step: Callable[[], Any]) -> Any:
        """Run a step of the call; a core error becomes the task's error, naming the shards."""
        try:
            return step()
        except api.BatchError as err:
            raise task_error(_about(self.label, err), retryable=api.is_retryable(err)) from err

    def _log_progress(self, progress: api.Progress) -> None:
        self.log.info("Shard(s) %s: %s", self.label, progress.describe())
        self.log.info("%s", progress.event(self.label))

    # -- deferrable path -------------------------------------------------------------------
    def _defer_unless_done(self, work: api.WorkId, context: Context, resubmits: int = 0) -> None:
        """The call was just submitted or found running: return if it has already ended well,
        raise if it failed, else defer to the trigger while Ray computes. Deferring ends this
        process, so the replica must have taken the call up first (``ShardCall.wait_started``).
        ``resubmits``: how often this try already submitted the work again after losing it."""
        outcome = self.call(context).wait_started(work, self.settings.start_timeout_s)
        if outcome.state == api.RunState.SUCCEEDED:
            return
        if outcome.state == api.RunState.FAILED:
            raise task_error(f"shard(s) {self.label} failed on Ray: {outcome.error}", retryable=outcome.retryable)
        self.log.info("Deferring while Ray computes shard(s) %s (%s)", self.label, work.to_dict())
        self.defer(
            trigger=RayShardTrigger(
                worker=work.replica,
                token=work.token,
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
            timeout=self.execution_timeout + timedelta(seconds=self.settings.deferred_timeout_grace_s) if self.execution_timeout else None,
        )

    def _cancel_at(self, context: Context) -> float | None:
        """When the trigger cancels the call: ``execution_timeout`` after this try started."""
        if not self.execution_timeout:
            return None
        start = getattr(context["ti"], "start_date", None)
        begun = start.timestamp() if start is not None else time.time()
        return begun + self.execution_timeout.total_seconds()

    def _summarise(self, results: list[api.ShardResult], task_seconds: float | None = None) -> dict[str, Any]:
        """Log each shard's figures; ``task_seconds`` (sync path only) also gives the overhead."""
        for r in results:
            self.log.info(
                "Shard %s %s: %s rows in, %s rows out, %s rows rejected, %s bytes, %.2f s (model %.2f s, %.1f rows/s)",
                r.shard_id, r.status, r.rows_in, r.rows_out, r.rows_rejected, r.bytes, r.seconds, r.model_seconds, r.rows_per_second,
            )
            self.log.info("%s", api.format_event(
                api.EventKind.SHARD_DONE, shard_id=r.shard_id, status=r.status, rows_in=r.rows_in, rows_out=r.rows_out,
                rows_rejected=r.rows_rejected, bytes=r.bytes, seconds=r.seconds, model_seconds=r.model_seconds,
                model_load_seconds=r.model_load_seconds, counters=r.counters,
            ))
            if r.counters:
                self.log.info("Shard %s counters: %s", r.shard_id, describe_counters(r.counters))
            if r.rows_rejected:
                self.log.warning(
                    "Shard %s rejected %s rows (bad_rows='skip'): see %s", r.shard_id, r.rows_rejected,
                    api.rejected_path(self.core_spec, r.shard_id),
                )
            if r.model_load_seconds:
                self.log.info("Ray replica (pid %s) loaded the model in %.2f s (once; later shards reuse it)", r.worker_pid, r.model_load_seconds)
            if r.note:
                self.log.warning("%s", r.note)
        model = sum(r.model_seconds for r in results)
        if task_seconds is not None:
            self.log.info("Shard task wall %.3f s, model %.3f s, overhead %.3f s", task_seconds, model, task_seconds - model)
            self.log.info("%s", api.format_event(
                api.EventKind.SHARD_TASK, task_seconds=task_seconds, model_seconds=model, overhead_seconds=task_seconds - model,
            ))
        return api.summarise(results, task_seconds)


def describe_counters(counters: dict[str, Any]) -> str:
    """Counters for a log line: ``gpu_seconds=12.5, tokens_in=4,096, ...`` (seconds to 0.1)."""
    return ", ".join(f"{name}={value:,.1f}" if isinstance(value, float) else f"{name}={value:,}" for name, value in counters.items())


def _about(label: str, err: BaseException) -> str:
    """A core error's message, naming the work unit unless it already starts with it."""
    message = str(err)
    return message if message.startswith("shard(s) ") else f"shard(s) {label}: {message}"


class FinalizeBatchOperator(_SpecOperator):
    """Check every planned shard is committed, write ``_SUCCESS``, emit the sink's asset event.

    :param plan_task_id: task id of the plan step (for the job's start time).
    :param ray_conn_id: ``ray_batch`` connection, for stopping the model's replicas.
    :param release_replicas: stop the model's idle replicas now rather than at their idle
        timeout. (Formerly ``release_workers``, still accepted with a DeprecationWarning.)
    :param partitioned_asset: with a templated sink, the outlets' asset events name the
        partition this run wrote (what the template rendered to; see docs/assets.md), so a
        DAG on a ``PartitionedAssetTimetable`` runs once per partition. In a partitioned DAG
        run, Airflow gives the events the run's own partition key instead. ``False``: finalize
        names no partition, for DAGs on a plain asset schedule (Airflow queues those only
        for events without a key; in a partitioned run it still adds the run's).
    """

    ui_color = "#e9f7ec"

    @api.renamed_keywords(release_workers="release_replicas")
    def __init__(
        self,
        *,
        plan_task_id: str | None = None,
        ray_conn_id: str = RayHook.default_conn_name,
        release_replicas: bool = True,
        partitioned_asset: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.plan_task_id = plan_task_id
        self.ray_conn_id = ray_conn_id
        self.release_replicas = release_replicas
        self.partitioned_asset = partitioned_asset
        # The sink as written, before rendering replaces ``spec``: the partition key is what
        # its templated parts rendered to.
        self.sink_template = self.spec.get("sink")

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
        result["counters"] = manifest.get("counters") or {}
        if "cost" in manifest:
            result["gpu_hour_price"], result["cost"] = manifest["gpu_hour_price"], manifest["cost"]
        result["computed_this_run"] = summary.get("pending")
        result["elapsed_seconds"] = elapsed
        if elapsed and summary.get("pending_rows"):
            result["rows_per_second"] = summary["pending_rows"] / elapsed
        self.log.info(
            "Batch complete: %s shards, %s rows in, %s rows out, %s rows rejected, %s bytes in %s (%s computed this run)",
            result["shards"], result["rows_in"], result["rows_out"], result["rows_rejected"], result["bytes"],
            self.core_spec.sink_root, summary.get("pending"),
        )
        if result["counters"]:
            self.log.info("Counters of every shard: %s", describe_counters(result["counters"]))
        if "cost" in result:
            self.log.info(
                "Cost: %.2f (%.3f GPU-hours at %s per GPU-hour)",
                result["cost"], result["counters"].get("gpu_seconds", 0) / 3600, result["gpu_hour_price"],
            )
        self.log.info("%s", api.format_event(api.EventKind.RESULT, **result))
        if result["rows_rejected"]:
            self.log.warning("%s rows were rejected (bad_rows='skip'): they are in %s", result["rows_rejected"], manifest["rejected_dir"])
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = {k: v for k, v in result.items() if v is not None}
        self._name_partition(context)
        if self.release_replicas and summary.get("pending"):
            RayHook(ray_conn_id=self.ray_conn_id).get_conn()
            released = self.replicas.shutdown()
            self.log.info("Released %s idle replica(s) of this model (any serving a shard of another run keeps running)", released)
        return result

    def _name_partition(self, context: Context) -> None:
        """Put the partition this run wrote on the outlets' asset events (docs/assets.md)."""
        assets = [outlet for outlet in self.outlets if isinstance(outlet, Asset)]
        if not assets or not self.partitioned_asset:
            return
        run_key = getattr(context.get("dag_run"), "partition_key", None)
        if run_key:  # Airflow puts it on every event of the run, with the run's partition_date
            self.log.info("The asset event(s) of %s carry this DAG run's partition key %r", self.core_spec.sink_root, run_key)
            return
        key = partition_key(self.sink_template, self.batch_spec.sink) if isinstance(self.sink_template, str) else None
        if key is None:
            return
        for asset in assets:
            try:
                context["outlet_events"][asset].add_partitions(key)
            except ValueError as err:  # Airflow's limits on a key (length, blank)
                raise task_error(
                    f"the sink {self.core_spec.sink_root} is complete, but its asset event cannot name partition {key!r}: {err}. "
                    "Make the sink's templated part render to a shorter value, or pass partitioned_asset=False",
                    retryable=False,
                ) from err
        self.log.info("Asset event(s) for partition %r of %s (%s)", key, ", ".join(a.uri for a in assets), self.core_spec.sink_root)
