"""ShardCall: the life of one work unit's Ray call, driven the same way by every host.

A pool stands in for the replicas here (the wire form it speaks is what ReplicaPool speaks:
``tests/core/ray/test_pool.py`` runs that against a real Ray); what is asserted is the call's
own logic: which call is adopted, when one is submitted again, what is cancelled."""

from __future__ import annotations

import logging

import pytest

from airflow_batch_provider.core import api
from airflow_batch_provider.core.ray.call import ShardCall

RESULT = api.ShardResult("s0", "computed", rows_in=2, rows_out=2).to_dict()


class Pool:
    """Replicas that lose the first ``lose`` calls; records what the call asks of them."""

    def __init__(self, *, lose: int = 0, states: list[dict] | None = None, running: dict | None = None):
        self.lose = lose
        self.states = list(states or [{"state": "RUNNING"}])
        self.running = running
        self.submitted: list[dict] = []
        self.cancelled: list[dict] = []

    def submit(self, shards, attempt, storage_options, *, lease_timeout_s=None):
        self.submitted.append(attempt)
        return {"worker": f"r{len(self.submitted)}", "token": attempt["token"]}

    def result(self, work, *, on_progress=None, every_s=30.0):
        if len(self.submitted) <= self.lose:
            return None
        return [RESULT]

    def status(self, work):
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def find_running(self, key):
        return self.running

    def cancel(self, work):
        self.cancelled.append(work)
        return "RUNNING"


def call(pool: Pool, **kwargs) -> ShardCall:
    args = dict(unit="u1", label="s0", key="d/r/t/0/u1", try_number=1, max_retries=2, log=logging.getLogger("test"))
    args.update(kwargs)
    return ShardCall(pool, [], **args)


def test_a_call_lost_with_its_replica_is_submitted_again_and_each_new_call_is_heard_of():
    pool = Pool(lose=2)
    shard_call = call(pool)
    heard: list[api.WorkId] = []
    first = shard_call.submit()
    results = shard_call.follow(first, on_resubmit=heard.append)
    assert [r.shard_id for r in results] == ["s0"] and results[0].computed
    assert [w.replica for w in heard] == ["r2", "r3"] and all(w.unit == "u1" for w in heard)
    assert [a["key"] for a in pool.submitted] == ["d/r/t/0/u1"] * 3  # every try of this unit shares the key
    assert shard_call.results_of(first) == results  # the unit's results, though its first call was lost


def test_past_max_retries_the_try_fails_naming_the_budget():
    shard_call = call(Pool(lose=10), max_retries=1)
    with pytest.raises(api.CallLostError, match=r"lost 2 times .* max_retries=1") as raised:
        shard_call.follow(shard_call.submit())
    assert api.is_retryable(raised.value)  # a task retry computes what is not committed


def test_a_stored_call_of_other_shards_is_not_adopted():
    shard_call = call(Pool())
    assert shard_call.adopt({"worker": "r1", "token": "t", "unit": "other"}) is None
    assert shard_call.adopt({"worker": "r1", "token": "t", "unit": "u1"}) == api.WorkId("r1", "t", "u1")
    assert shard_call.adopt({"worker": "r1", "token": "t"}) == api.WorkId("r1", "t")  # stored before units had ids
    assert shard_call.adopt(None) is None


def test_a_retry_follows_the_call_its_earlier_try_left_running_and_a_first_try_asks_nobody():
    pool = Pool(running={"worker": "r7", "token": "old"})
    assert call(pool, try_number=2).submit() == api.WorkId("r7", "old", "u1")
    assert pool.submitted == []
    assert call(pool, try_number=1).submit().replica == "r1"


def test_wait_started_waits_while_the_call_is_only_leased():
    pool = Pool(states=[{"state": "RUNNING", "queued": True}] * 3 + [{"state": "RUNNING"}])
    outcome = call(pool).wait_started(api.WorkId("r1", "t"), timeout_s=30)
    assert outcome.state == api.RunState.RUNNING and outcome.started and not outcome.queued
    assert pool.states == [{"state": "RUNNING"}]  # asked until the replica took it up


def test_an_interrupted_wait_cancels_the_call_first():
    pool = Pool()

    def interrupted(work, **kwargs):
        raise KeyboardInterrupt  # stands in for the host's deadline or its being stopped

    pool.result = interrupted
    shard_call = call(pool)
    work = shard_call.submit()
    with pytest.raises(KeyboardInterrupt):
        shard_call.follow(work)
    assert pool.cancelled == [work.to_dict()]
    shard_call.cancel_followed()  # nothing followed any more: no second cancel
    assert len(pool.cancelled) == 1


def test_a_failed_call_raises_the_replicas_error_and_cancels_nothing():
    pool = Pool()

    def failed(work, **kwargs):
        raise api.RayWorkError("failed on Ray: InputDataError: a.jsonl line 3", retryable=False)

    pool.result = failed
    shard_call = call(pool)
    with pytest.raises(api.RayWorkError, match="line 3"):
        shard_call.follow(shard_call.submit())
    assert pool.cancelled == []


def test_outcomes_and_events_are_typed_and_keep_their_json_form():
    outcome = api.CallOutcome.from_dict({"state": "SUCCEEDED", "results": [RESULT]})
    assert outcome.ended and outcome.results[0].rows_out == 2
    running = api.CallOutcome.from_dict({"state": "RUNNING", "progress": {"rows_done": 1, "rows_total": 4, "seconds": 1.0}})
    assert not running.ended and running.progress == api.Progress(1, 4, 1.0)
    event = api.CallEvent(api.CallEnd.LOST, api.WorkId("r1", "t"), message="gone", resubmits=2)
    assert event.to_dict() == {"status": "lost", "worker": "r1", "token": "t", "message": "gone", "resubmits": 2}
    assert api.CallEvent.from_dict(event.to_dict()) == event
    with pytest.raises(ValueError, match="without results"):
        api.CallEvent.from_dict({"status": "success"})


def test_a_connection_error_of_a_process_not_on_ray_client_is_no_lost_connection():
    """Only Ray Client's ConnectionError (the process connected through ``ray://``) means the
    connection is gone; anywhere else it is the host's error: the call is cancelled, the error raised."""
    pool = Pool()

    def dropped(work, **kwargs):
        raise ConnectionError("Client is shutting down.")

    pool.result = dropped
    shard_call = call(pool)
    work = shard_call.submit()
    with pytest.raises(ConnectionError):
        shard_call.follow(work)
    assert pool.cancelled == [work.to_dict()]


def test_a_connection_lost_again_and_again_fails_the_try_naming_it(monkeypatch):
    """Each loss is connected again (the real case runs in test_ray_client.py); past
    RECONNECTS_PER_FOLLOW the try fails with a retryable error (a retry follows the call again)."""
    from airflow_batch_provider.core.ray import call as call_module

    reconnected = _on_ray_client(monkeypatch)
    pool = Pool()

    def dropped(work, **kwargs):
        raise ConnectionError("Client is shutting down.")

    pool.result = dropped
    shard_call = call(pool)
    with pytest.raises(api.RayWorkError, match="connection to Ray was lost") as caught:
        shard_call.follow(shard_call.submit())
    assert len(reconnected) == call_module.RECONNECTS_PER_FOLLOW and caught.value.retryable


def _on_ray_client(monkeypatch) -> list[int]:
    """This process connected through ``ray://`` (a stand-in: the real case runs in
    test_ray_client.py); returns the sessions that ``reconnect`` was asked to replace."""
    from airflow_batch_provider.core.ray import connection
    from airflow_batch_provider.core.ray.connection import RayTarget

    monkeypatch.setattr(connection, "_last", (RayTarget(address="ray://head:10001"), 5.0))
    reconnected: list[int] = []
    monkeypatch.setattr(connection, "reconnect", lambda session, err=None: reconnected.append(session))
    return reconnected


@pytest.mark.parametrize("reached", [True, False], ids=["the call reached its replica", "it did not"])
def test_a_connection_lost_while_submitting_follows_the_call_if_it_runs_else_submits(monkeypatch, reached):
    reconnected = _on_ray_client(monkeypatch)
    pool = Pool(running={"worker": "r1", "token": "t-sent"} if reached else None)
    submit = pool.submit

    def dropped_once(*args, **kwargs):
        if not reconnected:
            raise ConnectionError("Client is shutting down.")
        return submit(*args, **kwargs)

    pool.submit = dropped_once
    work = call(pool).submit()
    assert len(reconnected) == 1
    assert (work.token == "t-sent") is reached and len(pool.submitted) == (0 if reached else 1)
