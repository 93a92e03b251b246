"""The trigger of a deferred shard task: polls its Ray work from the triggerer.

While Ray computes a shard, the deferred task holds no worker slot; this trigger asks the
model replica (through the core's ``ReplicaPool.status``) how the call with the task's
attempt token is doing, every ``poll_interval`` seconds, with every blocking call in a
thread (``asyncio.to_thread``) so the triggerer's event loop never blocks.

When the replica is gone (its actor was killed, or its idle timeout ended it, or Ray lost
its result), the sink decides: if every shard of the work unit is committed with its part
in place the work is done (its results are rebuilt from the sentinels); otherwise the
trigger reports the call ``lost`` and the task, resumed, submits what is not committed to
another replica within the same try (up to the spec's ``max_retries``). The trigger
only reads: it never publishes, quarantines or deletes anything in the sink; writes happen
in task processes.

Secrets never travel in the trigger's kwargs (they are stored in Airflow's database): it
carries the ``ray_batch`` connection id and reads address and token in the triggerer.

The triggerer itself never connects to Ray (a process can join one cluster only): it asks
through one Ray client child process per cluster (``api.RayDriver``), so triggers of
shard tasks on different ``ray_batch`` connections each poll their own cluster.

Past ``cancel_at`` (the task's ``execution_timeout``) the trigger cancels the Ray call, which
frees the replica, and reports the timeout. A user who marks the deferred task failed or
success, or clears it, stops its Ray call too (``on_kill``, which Airflow calls only on such a
user action, never when a triggerer restarts: the call then goes on and the trigger follows it
again).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_batch_provider.core import api
from airflow_batch_provider.hooks.ray import RayHook
from airflow_batch_provider.hooks.storage import storage_options_for
from airflow_batch_provider.settings import configured
from airflow_batch_provider.spec import BatchSpec


class RayShardTrigger(BaseTrigger):
    """Wait for one shard task's Ray work (a ``Replica.run_shards`` call) to finish.

    Yields one event: ``{"status": "success", "results": [...], "worker", "token"}`` with the
    per-shard results, ``{"status": "lost", "message": ..., "worker", "token", "resubmits"}``
    when the call went with its replica or node and not every shard is committed, or
    ``{"status": "error", "message": ..., "worker", "token"}`` (with ``"retryable": False`` when
    the replica's error is one no retry can fix).

    :param worker: name of the Ray model replica running the work (the work id's JSON key,
        kept as it is so that triggers stored by earlier releases still load).
    :param token: the attempt token the work was submitted with.
    :param spec: the ``BatchSpec`` dict (to check the sink when the replica is gone).
    :param shards: the work unit's shard dicts.
    :param ray_conn_id: ``ray_batch`` connection (address and token are read in the triggerer).
    :param label: the work unit's label, for messages.
    :param poll_interval: seconds between status checks.
    :param progress_interval: seconds between progress lines in the task log.
    :param cancel_at: wall-clock time (epoch seconds) at which the call is cancelled and the
        task fails as timed out (its ``execution_timeout``); None: no deadline.
    :param resubmits: how many times this try already submitted the work again after losing it
        (echoed in the event, so the task counts against ``max_retries`` across deferrals).
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
        progress_interval: float = 30.0,
        cancel_at: float | None = None,
        resubmits: int = 0,
    ) -> None:
        super().__init__()
        self.cancel_at = cancel_at
        self.resubmits = resubmits
        self.worker = worker
        self.token = token
        self.spec = spec
        self.shards = shards
        self.ray_conn_id = ray_conn_id
        self.label = label
        self.poll_interval = poll_interval
        self.progress_interval = progress_interval

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
                "progress_interval": self.progress_interval,
                "cancel_at": self.cancel_at,
                "resubmits": self.resubmits,
            },
        )

    @property
    def work(self) -> api.WorkId:
        return api.WorkId(replica=self.worker, token=self.token)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            call = await self._connect()
            reported = time.monotonic()
            while True:
                outcome = await asyncio.to_thread(call.outcome, self.work)
                if outcome.state == api.RunState.RUNNING:
                    if self.cancel_at is not None and time.time() >= self.cancel_at:
                        yield await self._cancel(call)
                        return
                    if outcome.progress and time.monotonic() - reported >= self.progress_interval:
                        self.log.info("Shard(s) %s: %s", self.label, outcome.progress.describe())  # reaches the task log
                        self.log.info("%s", outcome.progress.event(self.label))
                        reported = time.monotonic()
                    await asyncio.sleep(self.poll_interval)
                    continue
                if outcome.state == api.RunState.SUCCEEDED:
                    yield self._event(api.CallEnd.SUCCESS, results=outcome.results)
                elif outcome.state == api.RunState.FAILED:
                    yield self._event(api.CallEnd.ERROR, message=f"shard(s) {self.label} failed on Ray: {outcome.error}",
                                      retryable=outcome.retryable)
                else:
                    yield await self._from_sink(outcome.state)
                return
        except Exception as err:  # report it as an event: the task fails (and retries) with this message
            yield self._event(api.CallEnd.ERROR, message=f"shard(s) {self.label}: polling Ray failed: {type(err).__name__}: {err}")

    # -- helpers (blocking ones run in a thread) -----------------------------------------
    def _spec(self) -> BatchSpec:
        return BatchSpec.from_dict(self.spec)

    async def _connect(self) -> api.ShardCall:
        target = await RayHook(ray_conn_id=self.ray_conn_id).aget_target()
        driver = await asyncio.to_thread(api.RayDriver.for_target, target)
        follower = api.DriverFollower(driver, self._spec().core().to_dict(), cancel_grace_s=configured().get("cancel_grace_s"))
        return api.ShardCall(follower, [], unit="", label=self.label, log=self.log)

    async def on_kill(self) -> None:
        """A user acted on the deferred task (marked it failed or success, cleared it): cancel
        its Ray call, which frees the replica; nothing of the call is committed."""
        call = await self._connect()
        state = await asyncio.to_thread(call.cancel, self.work)
        self.log.warning("Shard(s) %s stopped by a user: cancelled Ray work %s (it was %s); nothing of it was committed",
                         self.label, self.token, state)

    async def _cancel(self, call: api.ShardCall) -> TriggerEvent:
        state = await asyncio.to_thread(call.cancel, self.work)
        self.log.warning("Shard(s) %s passed its execution_timeout: cancelled Ray work %s (it was %s)", self.label, self.token, state)
        return self._event(api.CallEnd.ERROR, message=f"shard(s) {self.label}: execution_timeout reached; the Ray work {self.token} was "
                                                      f"cancelled ({state}) and its replica freed; a retry computes what is not committed")

    async def _from_sink(self, state: api.RunState) -> TriggerEvent:
        committed = await asyncio.to_thread(self._committed_results)
        if committed is not None:
            self.log.info("Ray work %s is %s, but every shard of %s is committed", self.token, state, self.label)
            return self._event(api.CallEnd.SUCCESS, results=[api.ShardResult.from_dict(r) for r in committed])
        return self._event(
            api.CallEnd.LOST,
            resubmits=self.resubmits,
            message=(
                f"shard(s) {self.label}: the Ray work {self.token} on {self.worker} is {state} (replica restarted "
                "or gone) and not every shard is committed"
            ),
        )

    def _committed_results(self) -> list[dict[str, Any]] | None:
        spec = self._spec()
        shards = [api.Shard.from_dict(raw) for raw in self.shards]
        return api.committed_results(spec.core(), storage_options_for(spec), shards)

    def _event(self, status: api.CallEnd, **fields: Any) -> TriggerEvent:
        return TriggerEvent(api.CallEvent(status, self.work, **fields).to_dict())
