"""The three operators of a batch inference job: plan, shard (mapped), finalize.

They are thin: each turns the templated spec dict back into a ``BatchSpec`` and calls the
core (``airflow_batch_provider.core``). ``batch_inference()`` in ``task_group.py`` wires
them into a task group; use them directly only for unusual layouts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, conf
from airflow.sdk.bases.resumablejobmixin import ResumableJobMixin
from airflow.sdk.exceptions import AirflowException

from airflow_batch_provider.core import ray_exec
from airflow_batch_provider.core.commit import JobStorage, new_attempt
from airflow_batch_provider.core.jobs import finalize_job, plan_job
from airflow_batch_provider.core.planning import Shard
from airflow_batch_provider.core.spec import BatchSpec
from airflow_batch_provider.exceptions import BatchError
from airflow_batch_provider.hooks.ray import RayHook
from airflow_batch_provider.hooks.storage import storage_options_for
from airflow_batch_provider.triggers.shard import RayShardTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context


class BatchInferenceException(AirflowException):
    """A batch inference step failed; the message says which shard/file and what to do."""


def _spec_dict(spec: BatchSpec | dict[str, Any]) -> dict[str, Any]:
    return spec.to_dict() if isinstance(spec, BatchSpec) else dict(spec)


class _SpecOperator(BaseOperator):
    """Holds the spec as a templated dict (paths may use ``{{ ds }}`` and friends)."""

    template_fields: Sequence[str] = ("spec",)

    def __init__(self, *, spec: BatchSpec | dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = _spec_dict(spec)

    @cached_property
    def batch_spec(self) -> BatchSpec:
        try:
            return BatchSpec.from_dict(self.spec)
        except BatchError as err:
            raise BatchInferenceException(str(err)) from None

    @cached_property
    def job_storage(self) -> JobStorage:
        return JobStorage.for_spec(self.batch_spec, storage_options_for(self.batch_spec))


class PlanBatchOperator(_SpecOperator):
    """List the input once, persist the plan, and return the work units still to compute.

    Returns a list of ``{"label", "shards"}`` dicts, one per mapped shard task. Committed
    shards are left out; with more pending shards than ``[core] max_map_length``, several
    shards share one task so that the mapping always fits.

    :param ray_conn_id: ``ray`` connection, for starting the model replicas ahead.
    :param start_workers: when shards are pending, start up to this many of the model's Ray
        replicas now, without waiting, so the model loads while Airflow schedules the shard
        tasks. ``None``: as many as the pending tasks and the cluster allow (what shard tasks
        running all at once would create); ``0``: none. Keep it at the shard tasks'
        concurrency cap, or replicas beyond it hold their CPUs/GPUs unused until ``finalize``
        releases them. Best effort: if Ray cannot be reached, a warning is logged and the
        shard tasks start the replicas instead.
    """

    template_fields: Sequence[str] = ("spec", "ray_conn_id")
    ui_color = "#e8f4fd"

    def __init__(self, *, ray_conn_id: str = RayHook.default_conn_name, start_workers: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ray_conn_id = ray_conn_id
        self.start_workers = start_workers

    def execute(self, context: Context) -> list[dict[str, Any]]:
        started = time.time()
        spec = self.batch_spec
        try:
            job = plan_job(spec, self.job_storage)
        except BatchError as err:
            raise BatchInferenceException(str(err)) from None
        for note in job.notes:
            self.log.warning("%s", note)
        units = job.work_units(conf.getint("core", "max_map_length", fallback=1024))
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

    def _start_workers(self, spec: BatchSpec, wanted: int) -> None:
        try:
            RayHook(ray_conn_id=self.ray_conn_id).get_conn()
            names = ray_exec.start_workers(spec, wanted)
        except Exception as err:  # an optimisation only: the shard tasks connect and report
            self.log.warning("Could not start Ray workers ahead (%s: %s); the shard tasks will start them", type(err).__name__, err)
            return
        self.log.info("Started %s Ray worker(s) ahead, loading the model: %s", len(names), ", ".join(names))


class BatchShardOperator(ResumableJobMixin, _SpecOperator):
    """Compute one work unit (usually one shard) on a Ray worker and commit its part.

    The Ray call is recorded in ``task_state_store`` (``ResumableJobMixin``): a retry whose
    Ray work is still running waits for it instead of starting it again, and a retry of a
    shard that got committed meanwhile returns at once. A try that died between submitting and
    recording is covered too: its retry asks the model's replicas for work of this task.

    :param spec: the ``BatchSpec`` (or its dict).
    :param work_unit: one item of the plan task's output (``{"label", "shards"}``).
    :param ray_conn_id: ``ray`` connection; see :class:`~airflow_batch_provider.hooks.ray.RayHook`.
    :param deferrable: submit the Ray work, then defer to
        :class:`~airflow_batch_provider.triggers.shard.RayShardTrigger` while Ray computes,
        so the task holds no worker slot (needs ``airflow triggerer``). Default:
        ``[operators] default_deferrable``.
    :param poll_interval: seconds between the trigger's status checks (deferrable only).
    """

    template_fields: Sequence[str] = ("spec", "work_unit", "ray_conn_id")
    external_id_key = "ray_shard_call"
    ui_color = "#fdf1e8"
    #: seconds to wait, after submitting, for the Ray worker to report the call as started.
    start_timeout_s: float = 60.0

    def __init__(
        self,
        *,
        work_unit: dict[str, Any],
        ray_conn_id: str = RayHook.default_conn_name,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.work_unit = work_unit
        self.ray_conn_id = ray_conn_id
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self._ref: Any = None
        self._results: list[dict[str, Any]] | None = None

    @cached_property
    def shards(self) -> list[Shard]:
        return [Shard.from_dict(s) for s in self.work_unit["shards"]]

    def execute(self, context: Context) -> dict[str, Any]:
        started = time.perf_counter()
        RayHook(ray_conn_id=self.ray_conn_id).get_conn()
        if self.deferrable:
            return self._execute_deferrable(context)
        self.execute_resumable(context)
        return self._summarise(self._results or [], time.perf_counter() - started)

    # -- deferrable path -------------------------------------------------------------------
    def _execute_deferrable(self, context: Context) -> dict[str, Any]:
        """Submit (or reconnect to) the Ray work, check once, then defer to the trigger."""
        store = context.get("task_state_store")
        external_id = store.get(self.external_id_key) if store is not None else None
        status = self.get_job_status(external_id, context) if external_id else None
        if status == "SUCCEEDED":
            self.log.info("Ray work %s already finished; not submitting again", external_id)
            return self._summarise(self.get_job_result(external_id, context))
        if status == "RUNNING":
            self.log.info("Reconnecting to running Ray work %s", external_id)
        else:
            if external_id:
                self.log.warning("Earlier Ray work %s is %s; computing what is not committed", external_id, status)
            external_id = self.submit_job(context)
            if store is not None:
                store.set(self.external_id_key, external_id)
            status = self._wait_started(external_id, context)
        if status == "SUCCEEDED":
            return self._summarise(self.get_job_result(external_id, context))
        if status == "FAILED":
            self._raise_failed(external_id)
        self.log.info("Deferring while Ray computes shard(s) %s (%s)", self.work_unit["label"], external_id)
        self.defer(
            trigger=RayShardTrigger(
                worker=external_id["worker"],
                token=external_id["token"],
                spec=self.spec,
                shards=self.work_unit["shards"],
                ray_conn_id=self.ray_conn_id,
                label=self.work_unit["label"],
                poll_interval=self.poll_interval,
            ),
            method_name="execute_complete",
            timeout=self.execution_timeout,
        )

    def _wait_started(self, external_id: dict[str, str], context: Context) -> str:
        """The submitted call is queued on the actor; wait until the actor reports it (or its end)."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            status = self.get_job_status(external_id, context)
            if status != "UNKNOWN" or time.monotonic() > deadline:
                return status
            time.sleep(0.2)

    def _raise_failed(self, external_id: dict[str, str]) -> None:
        outcome = ray_exec.work_status(external_id["worker"], external_id["token"])
        raise BatchInferenceException(f"shard(s) {self.work_unit['label']} failed on Ray: {outcome.get('error')}")

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger fired: validate its event, return the shard summary."""
        if not isinstance(event, dict) or "status" not in event:
            raise BatchInferenceException(
                f"shard(s) {self.work_unit['label']}: the trigger returned no valid event ({event!r}); retrying computes what is not committed"
            )
        if event["status"] != "success":
            raise BatchInferenceException(event.get("message") or f"shard(s) {self.work_unit['label']} failed: {event!r}")
        results = event.get("results")
        if not isinstance(results, list):
            raise BatchInferenceException(f"shard(s) {self.work_unit['label']}: success event without results ({event!r})")
        self.log.info("Ray work %s finished", event.get("token"))
        return self._summarise(results)

    # -- ResumableJobMixin ---------------------------------------------------------------
    def submit_job(self, context: Context) -> dict[str, str]:
        ti = context["ti"]
        task_key = {"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id, "map_index": ti.map_index}
        spec = self.batch_spec
        if ti.try_number > 1 and (running := ray_exec.find_running_work(spec, task_key)):
            # An earlier try submitted this work but died before task_state_store held its id.
            self.log.info("Reconnecting to running Ray work %s of an earlier try (its id was never stored)", running)
            self._ref = None
            return running
        attempt = new_attempt(**task_key, try_number=ti.try_number)
        worker, self._ref = ray_exec.submit(spec, self.shards, attempt, storage_options_for(spec))
        self.log.info("Shard(s) %s submitted to Ray worker %s (attempt %s)", self.work_unit["label"], worker, attempt["token"])
        return {"worker": worker, "token": attempt["token"]}

    def get_job_status(self, external_id: Any, context: Context) -> str:
        return ray_exec.work_status(external_id["worker"], external_id["token"])["state"]

    def is_job_active(self, status: str) -> bool:
        return status == "RUNNING"

    def is_job_succeeded(self, status: str) -> bool:
        return status == "SUCCEEDED"

    def poll_until_complete(self, external_id: Any, context: Context) -> None:
        if self._ref is not None:
            try:
                self._results = ray_exec.ray.get(self._ref)
            except Exception as err:
                raise BatchInferenceException(_ray_error_message(err, self.work_unit["label"])) from None
            return
        self.log.info("Reconnected to running Ray work %s; waiting for it", external_id)
        handle = ray_exec.find_worker(external_id["worker"])
        while handle is not None:
            outcome = ray_exec.ray.get(handle.wait.remote(external_id["token"], 30.0))
            if outcome["state"] == "RUNNING":
                continue
            if outcome["state"] == "SUCCEEDED":
                self._results = outcome["results"]
                return
            if outcome["state"] == "FAILED":
                raise BatchInferenceException(f"shard(s) {self.work_unit['label']} failed on Ray: {outcome['error']}")
            break
        self.log.warning("Ray work %s is gone (worker restarted?); computing what is not committed", external_id)
        self.submit_job(context)
        self.poll_until_complete(external_id, context)

    def get_job_result(self, external_id: Any, context: Context) -> Any:
        if self._results is None:
            outcome = ray_exec.work_status(external_id["worker"], external_id["token"])
            self._results = outcome.get("results", [])
        return self._results

    def _summarise(self, results: list[dict[str, Any]], task_seconds: float | None = None) -> dict[str, Any]:
        """Log each shard's figures; ``task_seconds`` (sync path only) also gives the overhead."""
        for r in results:
            rate = r["rows_in"] / r["seconds"] if r["seconds"] else 0.0
            self.log.info(
                "Shard %s %s: %s rows in, %s rows out, %s bytes, %.2f s (model %.2f s, %.1f rows/s)",
                r["shard_id"], r["status"], r["rows_in"], r["rows_out"], r["bytes"], r["seconds"], r["model_seconds"], rate,
            )
            if r.get("model_load_seconds"):
                self.log.info("Ray worker %s loaded the model in %.2f s (once; later shards reuse it)", r.get("worker_pid"), r["model_load_seconds"])
            if r.get("note"):
                self.log.warning("%s", r["note"])
        model = sum(r["model_seconds"] for r in results)
        if task_seconds is not None:
            self.log.info("Shard task wall %.3f s, model %.3f s, overhead %.3f s", task_seconds, model, task_seconds - model)
        return {
            "task_seconds": task_seconds,
            "shards": [r["shard_id"] for r in results],
            "computed": sum(r["status"] == "computed" for r in results),
            "rows_in": sum(r["rows_in"] for r in results),
            "rows_out": sum(r["rows_out"] for r in results),
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
            manifest = finalize_job(self.batch_spec, self.job_storage, elapsed_seconds=elapsed)
        except BatchError as err:
            raise BatchInferenceException(str(err)) from None
        result = {k: manifest[k] for k in ("shards", "rows_in", "rows_out", "bytes", "sink", "spec_fingerprint")}
        result["computed_this_run"] = summary.get("pending")
        result["elapsed_seconds"] = elapsed
        if elapsed and summary.get("pending_rows"):
            result["rows_per_second"] = summary["pending_rows"] / elapsed
        self.log.info(
            "Batch complete: %s shards, %s rows in, %s rows out, %s bytes in %s (%s computed this run)",
            result["shards"], result["rows_in"], result["rows_out"], result["bytes"], self.batch_spec.sink_root, summary.get("pending"),
        )
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = {k: v for k, v in result.items() if v is not None}
        if self.release_workers and summary.get("pending"):
            RayHook(ray_conn_id=self.ray_conn_id).get_conn()
            released = ray_exec.kill_workers(self.batch_spec)
            self.log.info("Released %s Ray worker(s) of this model", released)
        return result


def _ray_error_message(err: Exception, label: str) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(cause, BatchError):
        return f"shard(s) {label}: {cause}"
    return f"shard(s) {label} failed on Ray: {type(cause or err).__name__}: {cause or err}"
