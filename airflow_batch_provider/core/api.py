"""The core's one entry point: what the Airflow layer (and any other host) calls.

A job is three steps around a pool of model replicas on Ray:

* :func:`plan`: list the input, persist the plan, return the shards still to compute;
* :class:`ShardCall`: the life of one work unit's call on the model's replicas (submit, wait
  until started, follow or poll, resubmit a lost call, cancel), on a :class:`ReplicaPool`
  (which starts, leases and shuts down the replicas: each shard is checked, computed and
  committed by its replica) or, from a process that must not join Ray, a :class:`DriverFollower`;
* :func:`finalize`: prove that every shard of the plan is committed; write ``_SUCCESS``.

:func:`sink_status`, :func:`verify_sink` and :func:`collect_garbage` serve the people who
operate a sink (the status page, the ``airflow-batch`` CLI). :class:`ShardRunner` runs shards
in this process instead (tests, benchmarks, a host without Ray). :func:`committed_results` answers, reading only, whether some shards are committed (for a
process that must not write to the sink, such as Airflow's triggerer). Storage credentials
come in as ``storage_options`` (s3fs style); attempts carry an opaque key of the caller's.
:func:`format_event` makes the log line of a structured event: progress and results as data
for the programs that read the host's logs (``core/events.py``: the wire format, the parser).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from airflow_batch_provider.core.renames import warn_renamed

if TYPE_CHECKING:
    from airflow_batch_provider.core.domain.commit import new_attempt
    from airflow_batch_provider.core.domain.inspection import NotASinkError, SinkStatus, Verification, collect_garbage, sink_status, verify_sink
    from airflow_batch_provider.core.domain.jobs import JobPlan
    from airflow_batch_provider.core.domain.planning import Shard
    from airflow_batch_provider.core.domain.results import ShardResult, summarise
    from airflow_batch_provider.core.errors import (
        BatchError,
        BatchSpecError,
        CallLostError,
        RayWorkError,
        ResourcesUnavailableError,
        ShardCancelledError,
        is_retryable,
    )
    from airflow_batch_provider.core.events import EventKind, format_event
    from airflow_batch_provider.core.execution.runner import ShardRunner
    from airflow_batch_provider.core.ray.call import DriverFollower, ShardCall
    from airflow_batch_provider.core.ray.connection import RayTarget, connect
    from airflow_batch_provider.core.ray.driver import RayDriver
    from airflow_batch_provider.core.ray.pool import ReplicaPool
    from airflow_batch_provider.core.ray.states import CallEnd, CallEvent, CallOutcome, Progress, RunState, WorkId
    from airflow_batch_provider.core.renames import renamed_keywords
    from airflow_batch_provider.core.spec import JobSpec, describe_runtime_env
    from airflow_batch_provider.core.stores import is_remote
    from airflow_batch_provider.core.stores.urls import S3_SCHEMES, check_location
    from airflow_batch_provider.core.tunables import Tunables

#: where each name of this API lives. Loaded on first use: Airflow imports this module while
#: it parses DAG files and in processes that fork task processes (scheduler, DAG processor,
#: triggerer, Celery workers). Parsing must stay light (no pyarrow), and a task forked from a
#: process with Ray's core library loaded can be aborted by Ray while it connects.
_HOMES = {
    "new_attempt": "core.domain.commit",
    **dict.fromkeys(("NotASinkError", "SinkStatus", "Verification", "collect_garbage", "sink_status", "verify_sink"), "core.domain.inspection"),
    "JobPlan": "core.domain.jobs",
    "Shard": "core.domain.planning",
    **dict.fromkeys(("ShardResult", "summarise"), "core.domain.results"),
    **dict.fromkeys(("BatchError", "BatchSpecError", "CallLostError", "RayWorkError", "ResourcesUnavailableError",
                     "ShardCancelledError", "is_retryable"), "core.errors"),
    **dict.fromkeys(("EventKind", "format_event"), "core.events"),
    "ShardRunner": "core.execution.runner",
    **dict.fromkeys(("DriverFollower", "ShardCall"), "core.ray.call"),
    **dict.fromkeys(("RayTarget", "connect"), "core.ray.connection"),
    "RayDriver": "core.ray.driver",
    "ReplicaPool": "core.ray.pool",
    **dict.fromkeys(("CallEnd", "CallEvent", "CallOutcome", "Progress", "RunState", "WorkId"), "core.ray.states"),
    **dict.fromkeys(("JobSpec", "describe_runtime_env"), "core.spec"),
    **dict.fromkeys(("S3_SCHEMES", "check_location"), "core.stores.urls"),
    "is_remote": "core.stores",
    "renamed_keywords": "core.renames",
    "Tunables": "core.tunables",
}


#: old names of this API -> their new names (each still works, with a DeprecationWarning).
_RENAMED = {"BatchSpec": "JobSpec"}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        warn_renamed(name, _RENAMED[name], "airflow_batch_provider.core.api")
        return __getattr__(_RENAMED[name])
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"airflow_batch_provider.{home}"), name)
    globals()[name] = value
    return value


def plan(spec: JobSpec, storage_options: dict[str, Any] | None = None, *, reset_key: str | None = None) -> JobPlan:
    """Plan the job (reusing the persisted plan and every committed shard).

    ``reset_key`` names the host's run (opaque): with ``resume=False`` the earlier output is
    removed once per key, so a retried plan keeps what its run committed since."""
    from airflow_batch_provider.core.domain.jobs import plan_job
    from airflow_batch_provider.core.domain.layout import JobStorage

    return plan_job(spec, JobStorage.for_spec(spec, storage_options), reset_key=reset_key)


def finalize(spec: JobSpec, storage_options: dict[str, Any] | None = None, *, elapsed_seconds: float | None = None) -> dict[str, Any]:
    """Check that every planned shard is committed with its part in place; write ``_SUCCESS``."""
    from airflow_batch_provider.core.domain.jobs import finalize_job
    from airflow_batch_provider.core.domain.layout import JobStorage

    return finalize_job(spec, JobStorage.for_spec(spec, storage_options), elapsed_seconds=elapsed_seconds)


def committed_results(spec: JobSpec, storage_options: dict[str, Any] | None, shards: list[Shard]) -> list[dict[str, Any]] | None:
    """Each shard's result rebuilt from its sentinel when every one is committed, else None.

    Reads only: a commit whose part is not yet published counts as not committed here (the
    next shard task rolls it forward)."""
    from airflow_batch_provider.core.domain.commit import inspect_shard
    from airflow_batch_provider.core.domain.layout import JobStorage
    from airflow_batch_provider.core.domain.redrive import inspect_unit
    from airflow_batch_provider.core.domain.results import ShardResult

    storage = JobStorage.for_spec(spec, storage_options)
    results = []
    for shard in shards:
        check = inspect_unit(storage, shard) if shard.redrive else inspect_shard(storage, shard)
        if not check.committed:
            return None
        results.append(ShardResult.skipped(shard.shard_id, check.sentinel, note="committed while its Ray replica went away").to_dict())
    return results


def rejected_path(spec: JobSpec, shard_id: str) -> str:
    """Where the rows a shard rejected (``bad_rows="skip"``) are, once it is committed."""
    from airflow_batch_provider.core.domain import layout

    return layout.rejected_path(spec.sink_root, shard_id)


__all__ = [
    "S3_SCHEMES",
    "BatchError",
    "JobSpec",
    "BatchSpecError",
    "CallEnd",
    "CallEvent",
    "CallLostError",
    "CallOutcome",
    "DriverFollower",
    "EventKind",
    "JobPlan",
    "NotASinkError",
    "Progress",
    "RayDriver",
    "RayTarget",
    "RayWorkError",
    "ResourcesUnavailableError",
    "ReplicaPool",
    "RunState",
    "Shard",
    "ShardCall",
    "ShardCancelledError",
    "ShardResult",
    "ShardRunner",
    "SinkStatus",
    "Tunables",
    "Verification",
    "WorkId",
    "check_location",
    "collect_garbage",
    "committed_results",
    "connect",
    "describe_runtime_env",
    "finalize",
    "format_event",
    "is_remote",
    "is_retryable",
    "new_attempt",
    "plan",
    "rejected_path",
    "renamed_keywords",
    "sink_status",
    "summarise",
    "verify_sink",
]
