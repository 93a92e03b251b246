"""``batch_inference()``: add a whole batch inference job to the current DAG."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Asset, TaskGroup

from airflow_batch_provider.assets import asset_uri
from airflow_batch_provider.core import api
from airflow_batch_provider.hooks.ray import RayHook
from airflow_batch_provider.operators.batch import BatchShardOperator, FinalizeBatchOperator, PlanBatchOperator
from airflow_batch_provider.spec import BatchSpec


def sink_asset(spec: BatchSpec) -> Asset:
    """The Airflow Asset updated when the job's sink is complete. A templated sink's URI is
    the sink's untemplated root (``s3://lake/emb/{{ ds }}`` -> ``s3://lake/emb``), and each
    run's event names the partition it wrote (docs/assets.md); the name holds the sink as
    written, as before."""
    return Asset(name=f"batch_inference:{spec.sink_root}", uri=asset_uri(spec.sink_root))


@api.renamed_keywords(release_workers="release_replicas")
def batch_inference(
    spec: BatchSpec,
    *,
    group_id: str = "batch_inference",
    ray_conn_id: str = RayHook.default_conn_name,
    shard_retries: int | None = None,
    pool: str | None = None,
    max_active_shards: int | None = None,
    shards_per_task: int = 1,
    progress_interval: float = 30.0,
    release_replicas: bool = True,
    partitioned_asset: bool = True,
    asset: Asset | None = None,
    deferrable: bool | None = None,
    shard_kwargs: dict[str, Any] | None = None,
) -> TaskGroup:
    """Add ``plan -> shard (mapped, one task per shard) -> finalize`` as a task group.

    :param spec: the job.
    :param group_id: task group id (several jobs can live in one DAG).
    :param ray_conn_id: ``ray_batch`` connection for the plan (starts replicas ahead) and shard tasks.
    :param shard_retries: Airflow retries of a failed shard task (only that shard reruns).
        Default: the DAG's own (``default_args``, else ``[core] default_task_retries``), like
        any other task of the DAG; ``shard_kwargs`` may set ``retry_delay`` and friends.
    :param pool: Airflow pool for the shard tasks, e.g. one slot per GPU.
    :param max_active_shards: shard tasks running at once in one DAG run
        (``max_active_tis_per_dagrun``); set it to the number of GPUs (or model replicas).
    :param shards_per_task: shards per mapped task. ``rows_per_shard`` sets what a crash can
        lose (each shard commits on its own); this sets how many tasks Airflow schedules.
    :param progress_interval: seconds between a running shard's progress lines in its task log.
    :param release_replicas: finalize stops the model's idle replicas (else they idle out).
        (Formerly ``release_workers``, still accepted with a DeprecationWarning.)
    :param partitioned_asset: with a templated sink, the asset event names the partition the
        run wrote, for downstream DAGs on a ``PartitionedAssetTimetable`` (docs/assets.md);
        ``False`` for downstream DAGs on a plain asset schedule.
    :param asset: the Asset finalize updates, instead of :func:`sink_asset` (e.g. where two
        templated sinks share an untemplated root, which Airflow cannot give two assets).
    :param deferrable: shard tasks defer while Ray computes and hold no worker slot (needs a
        running ``airflow triggerer``); default ``[operators] default_deferrable``.
    :param shard_kwargs: more BaseOperator arguments for the shard tasks.
    """
    with TaskGroup(group_id=group_id) as group:
        # Replicas started ahead by the plan: no more than the shards that can run at once
        # (a pool's size is not known here, so with a pool only the first replica).
        ahead = max_active_shards if max_active_shards else (1 if pool else None)
        plan = PlanBatchOperator(task_id="plan", spec=spec, ray_conn_id=ray_conn_id, start_replicas=ahead, shards_per_task=shards_per_task)
        extra = dict(shard_kwargs or {})
        if pool:
            extra["pool"] = pool
        if max_active_shards:
            extra["max_active_tis_per_dagrun"] = max_active_shards
        if deferrable is not None:
            extra["deferrable"] = deferrable
        if shard_retries is not None:
            extra["retries"] = shard_retries
        shards = BatchShardOperator.partial(
            task_id="shard",
            spec=spec,
            ray_conn_id=ray_conn_id,
            progress_interval=progress_interval,
            map_index_template="{{ task.work_unit['label'] }}",
            **extra,
        ).expand(work_unit=plan.output)
        finalize = FinalizeBatchOperator(
            task_id="finalize",
            spec=spec,
            plan_task_id=plan.task_id,
            ray_conn_id=ray_conn_id,
            release_replicas=release_replicas,
            partitioned_asset=partitioned_asset,
            trigger_rule="none_failed",
            outlets=[asset if asset is not None else sink_asset(spec)],
        )
        plan >> shards >> finalize
    return group
