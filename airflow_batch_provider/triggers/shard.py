"""The trigger of a deferred shard task: polls its Ray work from the triggerer.

While Ray computes a shard, the deferred task holds no worker slot; this trigger asks the
Ray worker actor (``ShardWorker.status``) how the call with the task's attempt token is
doing, every ``poll_interval`` seconds, with every blocking Ray call in a thread
(``asyncio.to_thread``) so the triggerer's event loop never blocks.

When the worker is gone (its actor was killed, or its idle timeout ended it, or Ray lost
its result), the sink decides: if every shard of the work unit has a commit sentinel the
work is done (its results are rebuilt from the sentinels); otherwise the trigger reports a
failure and the task's retry computes what is not committed.

Secrets never travel in the trigger's kwargs (they are stored in Airflow's database): it
carries the ``ray`` connection id and reads address and token in the triggerer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_batch_provider.hooks.ray import RayHook

#: States of ``ShardWorker.status``.
RUNNING, SUCCEEDED, FAILED, UNKNOWN, LOST = "RUNNING", "SUCCEEDED", "FAILED", "UNKNOWN", "LOST"


class RayShardTrigger(BaseTrigger):
    """Wait for one shard task's Ray work (a ``ShardWorker.run_shards`` call) to finish.

    Yields one event: ``{"status": "success", "results": [...], "worker", "token"}`` with the
    per-shard results, or ``{"status": "error", "message": ..., "worker", "token"}``.

    :param worker: name of the Ray ``ShardWorker`` actor running the work.
    :param token: the attempt token the work was submitted with.
    :param spec: the ``BatchSpec`` dict (to check the sink when the worker is gone).
    :param shards: the work unit's shard dicts.
    :param ray_conn_id: ``ray`` connection (address and token are read in the triggerer).
    :param label: the work unit's label, for messages.
    :param poll_interval: seconds between status checks.
    """

    def __init__(
        self,
        *,
        worker: str,
        token: str,
        spec: dict[str, Any],
        shards: list[dict[str, Any]],
        ray_conn_id: str = RayHook.default_conn_name,
        label: str = "",
        poll_interval: float = 5.0,
    ) -> None:
        super().__init__()
        self.worker = worker
        self.token = token
        self.spec = spec
        self.shards = shards
        self.ray_conn_id = ray_conn_id
        self.label = label
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "worker": self.worker,
                "token": self.token,
                "spec": self.spec,
                "shards": self.shards,
                "ray_conn_id": self.ray_conn_id,
                "label": self.label,
                "poll_interval": self.poll_interval,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            await self._connect()
            while True:
                outcome = await asyncio.to_thread(self._status)
                state = outcome.get("state")
                if state == RUNNING:
                    self.log.debug("Ray work %s of shard(s) %s still running", self.token, self.label)
                    await asyncio.sleep(self.poll_interval)
                    continue
                if state == SUCCEEDED:
                    yield self._event("success", results=outcome.get("results", []))
                elif state == FAILED:
                    yield self._event("error", message=f"shard(s) {self.label} failed on Ray: {outcome.get('error')}")
                else:
                    yield await self._from_sink(state or UNKNOWN)
                return
        except Exception as err:  # report it as an event: the task fails (and retries) with this message
            yield self._event("error", message=f"shard(s) {self.label}: polling Ray failed: {type(err).__name__}: {err}")

    # -- helpers (blocking ones run in a thread) -----------------------------------------
    async def _connect(self) -> None:
        from airflow_batch_provider.core import ray_exec

        target = await RayHook(ray_conn_id=self.ray_conn_id).aget_target()
        await asyncio.to_thread(ray_exec.connect, target)

    def _status(self) -> dict[str, Any]:
        from airflow_batch_provider.core import ray_exec

        try:
            return ray_exec.work_status(self.worker, self.token, timeout=60)
        except ray_exec.ray.exceptions.RayActorError:
            return {"state": LOST}

    async def _from_sink(self, state: str) -> TriggerEvent:
        committed = await asyncio.to_thread(self._committed_results)
        if committed is not None:
            self.log.info("Ray work %s is %s, but every shard of %s is committed", self.token, state, self.label)
            return self._event("success", results=committed)
        return self._event(
            "error",
            message=(
                f"shard(s) {self.label}: the Ray work {self.token} on {self.worker} is {state} (worker restarted "
                "or gone) and not every shard is committed; a retry computes what is missing"
            ),
        )

    def _committed_results(self) -> list[dict[str, Any]] | None:
        from airflow_batch_provider.core.commit import JobStorage, check_shard
        from airflow_batch_provider.core.planning import Shard
        from airflow_batch_provider.core.runner import ShardResult
        from airflow_batch_provider.core.spec import BatchSpec
        from airflow_batch_provider.hooks.storage import storage_options_for

        spec = BatchSpec.from_dict(self.spec)
        storage = JobStorage.for_spec(spec, storage_options_for(spec))
        results = []
        for raw in self.shards:
            check = check_shard(storage, Shard.from_dict(raw))
            if not check.committed:
                return None
            results.append(ShardResult.skipped(raw["shard_id"], check.sentinel, note="committed while its Ray worker went away").to_dict())
        return results

    def _event(self, status: str, **payload: Any) -> TriggerEvent:
        return TriggerEvent({"status": status, "worker": self.worker, "token": self.token, **payload})
