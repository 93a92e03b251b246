"""Operations that break "every row once" on a healthy single run: fresh starts, runs sharing a
sink, superseded plans, and a commit path that must know its own attempt (local disk; the S3
side is in tests/core/stores/test_s3_safety.py)."""

from __future__ import annotations

import json
import os

import pytest

from airflow_batch_provider.core import failpoints
from airflow_batch_provider.core.domain import commit as commit_mod
from airflow_batch_provider.core.domain import jobs as jobs_mod
from airflow_batch_provider.core.domain.commit import check_shard, commit_shard, new_attempt, quarantine
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.domain.schema.input import load_input_schema
from airflow_batch_provider.core.errors import BatchError, CommitError, IncompleteJobError, StaleCheckpointError, StorageError
from airflow_batch_provider.core.execution.runner import ShardRunner
from tests.helpers import make_spec, run_all, run_killed_at, sink_ids, two_runs_at_once


@pytest.fixture
def spec(tmp_path, jsonl_source):
    return make_spec(jsonl_source, str(tmp_path / "out"), predictor_kwargs={"calls_log": str(tmp_path / "calls")})


def computed_rows(spec) -> int:
    """Rows the predictor has computed so far (every call appends its ids to ``calls_log``)."""
    path = spec.predictor_kwargs["calls_log"]
    return sum(len(json.loads(line)) for line in open(path)) if os.path.exists(path) else 0


def staged_on_disk(spec) -> list[str]:
    staging = os.path.join(spec.sink_root, "_staging")
    return sorted(os.listdir(staging)) if os.path.isdir(staging) else []


def stage(storage, shard, data: bytes = b"staged bytes"):
    staged = storage.sink.open_staged(storage.part_path(shard.shard_id))
    staged.stream.write(data)
    staged.finish()
    return staged


# -- 1. resume=False: once per run, only this job's files, _SUCCESS first ------------------------
def test_resume_false_starts_fresh_once_per_reset_key(spec):
    run_all(spec)
    finalize_job(spec)
    fresh = make_spec(spec.source, spec.sink, predictor_kwargs={"factor": 3, "calls_log": spec.predictor_kwargs["calls_log"]}, resume=False)
    job = plan_job(fresh, reset_key="dag/run-1/plan")
    assert len(job.pending) == 5 and "deleted 5 part files" in job.notes[0]
    runner = ShardRunner(fresh)
    runner.run(job.pending[0], new_attempt())
    runner.run(job.pending[1], new_attempt())
    # the plan task of the same run is retried (or cleared): what that run committed stays
    again = plan_job(fresh, reset_key="dag/run-1/plan")
    assert (again.committed, len(again.pending)) == (2, 3) and "already started fresh" in again.notes[0]
    for shard in again.pending:
        runner.run(shard, new_attempt())
    finalize_job(fresh)
    assert sink_ids(spec.sink_root) == list(range(380))
    # a new run of the DAG starts fresh again
    assert len(plan_job(fresh, reset_key="dag/run-2/plan").pending) == 5
    assert sink_ids(spec.sink_root) == []


def test_reset_removes_only_what_this_jobs_sentinels_name(spec, tmp_path):
    run_all(spec)
    finalize_job(spec)
    storage = JobStorage.for_spec(spec)
    # a file of another tool that looks like ours, an attempt of another run still streaming,
    # and another job's sentinel in a checkpoint_dir shared with this one
    foreign = os.path.join(spec.sink_root, "part-00000-spark.snappy.parquet")
    open(foreign, "wb").write(b"spark's")
    live = stage(storage, plan_job(spec).plan.shards[0], b"another run, mid-shard")
    shared = str(tmp_path / "shared-ckpt")
    mine = make_spec(spec.source, str(tmp_path / "mine"), checkpoint_dir=shared)
    other = make_spec(spec.source, str(tmp_path / "other"), checkpoint_dir=shared, rows_per_shard=1000)
    run_all(other)
    other_sentinels = sorted(os.listdir(os.path.join(shared, "shards")))
    assert other_sentinels

    plan_job(make_spec(spec.source, spec.sink, resume=False), reset_key="r1")
    assert os.path.exists(foreign) and os.path.exists(live.handle["staged"])
    assert not os.path.exists(storage.manifest_path)
    assert [n for n in os.listdir(spec.sink_root) if n.startswith("part-")] == [os.path.basename(foreign)]
    # the shared checkpoint: resetting "mine" leaves "other"'s sentinels alone
    with pytest.raises(StaleCheckpointError):  # its plan.json is other's: refused, nothing deleted
        plan_job(make_spec(mine.source, mine.sink, checkpoint_dir=shared))
    os.remove(os.path.join(shared, "plan.json"))  # (what a user sharing one checkpoint_dir gets)
    plan_job(make_spec(mine.source, mine.sink, checkpoint_dir=shared, resume=False), reset_key="r1")
    assert set(other_sentinels) <= set(os.listdir(os.path.join(shared, "shards")))
    assert len([n for n in os.listdir(other.sink_root) if n.startswith("part-")]) == len(other_sentinels)


def test_reset_deletes_success_before_any_part(spec, monkeypatch):
    run_all(spec)
    finalize_job(spec)
    storage = JobStorage.for_spec(spec)
    order = []
    real_delete = type(storage.sink).delete

    def recording_delete(self, path):
        order.append(os.path.basename(path))
        real_delete(self, path)

    monkeypatch.setattr(type(storage.sink), "delete", recording_delete)
    plan_job(make_spec(spec.source, spec.sink, resume=False))
    assert order[0] == "_SUCCESS" and sum(n.startswith("part-") for n in order) == 5


def fresh_spec(spec):
    return make_spec(spec.source, spec.sink, predictor_kwargs=spec.predictor_kwargs, resume=False)


def test_a_reset_during_finalize_takes_back_the_success_it_wrote(spec, monkeypatch):
    """Run 1's finalize has checked every shard when run 2 (resume=False) resets the sink:
    the _SUCCESS run 1 then writes would name parts that are gone."""
    run_all(spec)
    storage = JobStorage.for_spec(spec)
    real_hit = failpoints.hit

    def run_two_resets_here(name):
        if name == "finalize_before_manifest":
            plan_job(fresh_spec(spec), reset_key="dag/run-2/plan")
        real_hit(name)

    monkeypatch.setattr(failpoints, "hit", run_two_resets_here)
    with pytest.raises(IncompleteJobError, match="was reset .* while this run finalized"):
        finalize_job(spec, storage)
    monkeypatch.undo()
    assert not os.path.exists(storage.manifest_path) and sink_ids(spec.sink_root) == []
    # run 2 goes on: every row once, and its _SUCCESS names parts that are there
    fresh = fresh_spec(spec)
    again = plan_job(fresh, reset_key="dag/run-2/plan")
    assert "already started fresh" in again.notes[0] and len(again.pending) == 5
    for shard in again.pending:
        ShardRunner(fresh).run(shard, new_attempt())
    manifest = finalize_job(fresh)
    assert sink_ids(spec.sink_root) == list(range(380))
    assert all(os.path.exists(os.path.join(spec.sink_root, p["part"])) for p in manifest["parts"])


def test_a_finalize_during_a_reset_writes_no_success(spec, monkeypatch):
    """The reset has deleted _SUCCESS and not yet the parts when run 1's finalize checks them:
    it must not write a _SUCCESS the reset then leaves naming deleted parts."""
    run_all(spec)
    storage = JobStorage.for_spec(spec)
    real_delete = type(storage.sink).delete
    outcome = []

    def finalize_between_success_and_parts(self, path):
        real_delete(self, path)
        if path == storage.manifest_path and not outcome:
            try:
                outcome.append(finalize_job(spec))
            except IncompleteJobError as err:
                outcome.append(err)

    monkeypatch.setattr(type(storage.sink), "delete", finalize_between_success_and_parts)
    plan_job(fresh_spec(spec), reset_key="dag/run-2/plan")
    monkeypatch.undo()
    assert isinstance(outcome[0], IncompleteJobError) and "being reset" in str(outcome[0])
    assert not os.path.exists(storage.manifest_path) and sink_ids(spec.sink_root) == []


def test_a_reset_cut_short_then_resumed_can_finalize(spec, monkeypatch):
    run_all(spec)
    real_withdraw, withdrawn = jobs_mod.withdraw, []

    def crash_at_the_third_shard(*args):
        withdrawn.append(args[1])
        if len(withdrawn) == 3:
            raise failpoints.FailpointError("the reset's process dies here")
        return real_withdraw(*args)

    monkeypatch.setattr(jobs_mod, "withdraw", crash_at_the_third_shard)
    with pytest.raises(failpoints.FailpointError):
        plan_job(fresh_spec(spec), reset_key="dag/run-2/plan")
    monkeypatch.undo()
    with pytest.raises(IncompleteJobError, match="being reset"):
        finalize_job(spec)
    job = plan_job(spec)  # resume=True over what the reset left
    assert any("cut short" in n for n in job.notes), job.notes
    for shard in job.pending:
        ShardRunner(spec).run(shard, new_attempt())
    finalize_job(spec)
    assert sink_ids(spec.sink_root) == list(range(380))


def test_an_older_runs_retried_plan_never_resets_again(spec):
    """Run 1's plan task is retried after run 2 started fresh: run 2's shards stay."""
    fresh = fresh_spec(spec)
    runner = ShardRunner(fresh)
    for shard in plan_job(fresh, reset_key="dag/run-1/plan").pending:
        runner.run(shard, new_attempt())
    run_two = plan_job(fresh, reset_key="dag/run-2/plan")
    for shard in run_two.pending[:2]:
        runner.run(shard, new_attempt())
    retried = plan_job(fresh, reset_key="dag/run-1/plan")
    assert "already started fresh" in retried.notes[0] and (retried.committed, len(retried.pending)) == (2, 3)
    for shard in retried.pending:
        runner.run(shard, new_attempt())
    finalize_job(fresh)
    assert sink_ids(spec.sink_root) == list(range(380))
    assert computed_rows(spec) == 380 + 380  # run 1 all, then run 2 all (its first two shards not again)


# -- 2. runs sharing a sink ------------------------------------------------------------------
def test_two_runs_of_one_spec_at_once_both_finish_with_every_row_once(spec):
    results = two_runs_at_once(spec)
    assert [rows for _, rows in results] == [380, 380]
    statuses = [s for run, _ in results for s in run]
    assert len(statuses) == 10 and statuses.count("computed") == 5  # each shard committed once, whoever won it
    assert sink_ids(spec.sink_root) == list(range(380))


def test_finalize_leaves_a_live_attempts_staged_part_alone(spec):
    run_all(spec)
    storage = JobStorage.for_spec(spec)
    shard = plan_job(spec).plan.shards[0]
    live = stage(storage, shard, b"another run's attempt, still streaming")
    finalize_job(spec)  # this run is done; the other run's attempt is not
    assert os.path.exists(live.handle["staged"])
    won, _ = commit_shard(storage, shard, live, rows_in=1, rows_out=1, lines=1, attempt=new_attempt())
    assert not won and not os.path.exists(live.handle["staged"])  # it lost and discarded its own
    assert sink_ids(spec.sink_root) == list(range(380))


def test_finalize_aborts_staged_leftovers_idle_past_the_grace_period(spec):
    run_all(spec)
    storage = JobStorage.for_spec(spec)
    shard = plan_job(spec).plan.shards[0]
    orphan = stage(storage, shard, b"an attempt that crashed before its sentinel")
    old = os.path.getmtime(orphan.handle["staged"]) - 7200
    os.utime(orphan.handle["staged"], (old, old))
    foreign = stage(storage, type(shard)(**{**shard.to_dict(), "shard_id": "not-of-this-plan"}), b"x")
    os.utime(foreign.handle["staged"], (old, old))
    finalize_job(spec)
    assert not os.path.exists(orphan.handle["staged"])
    assert os.path.exists(foreign.handle["staged"])  # not this plan's: left to `airflow-batch gc`


def test_second_spec_is_refused_while_the_first_has_an_unfinished_plan(spec):
    plan_job(spec)  # run A planned, nothing committed yet (its shard tasks are starting)
    other = make_spec(spec.source, spec.sink, predictor_kwargs={"factor": 3})
    with pytest.raises(StaleCheckpointError, match=r"committed nothing yet.*predictor_kwargs.*new sink, or set resume=False"):
        plan_job(other)
    assert plan_job(spec).plan.spec_fingerprint == spec.fingerprint  # A's plan untouched


def test_first_plan_is_created_create_only(spec, monkeypatch):
    """Two runs planning an empty sink at once: the one that loses the create plans again
    against the winner's plan (and is refused when that is another spec)."""
    other = make_spec(spec.source, spec.sink, predictor_kwargs={"factor": 3})
    plan_job(spec)
    plan_job_plan_bytes = open(JobStorage.for_spec(spec).plan_path, "rb").read()
    os.remove(JobStorage.for_spec(spec).plan_path)
    storage = JobStorage.for_spec(other)
    real_create = type(storage.checkpoint).create_exclusive

    def other_run_plans_first(self, path, data):
        if path.endswith("plan.json") and not os.path.exists(path):
            real_create(self, path, plan_job_plan_bytes)  # run A's plan lands between B's read and B's create
        return real_create(self, path, data)

    monkeypatch.setattr(type(storage.checkpoint), "create_exclusive", other_run_plans_first)
    with pytest.raises(StaleCheckpointError, match="committed nothing yet"):
        plan_job(other, storage)
    assert plan_job(spec).plan.spec_fingerprint == spec.fingerprint


def test_the_loser_of_the_plan_race_leaves_the_winners_input_schema(spec, monkeypatch):
    """The loser of the create-only plan race has written its input schema before it is
    refused: that must not be the file the winner's shards read."""
    plan_job(spec)
    winner_plan = open(JobStorage.for_spec(spec).plan_path, "rb").read()
    os.remove(JobStorage.for_spec(spec).plan_path)
    other = make_spec(spec.source, spec.sink, input_schema={"id": "int64", "text": "string"})
    storage = JobStorage.for_spec(other)
    real_create = type(storage.checkpoint).create_exclusive

    def winner_plans_first(self, path, data):
        if path.endswith("plan.json") and not os.path.exists(path):
            real_create(self, path, winner_plan)
        return real_create(self, path, data)

    monkeypatch.setattr(type(storage.checkpoint), "create_exclusive", winner_plans_first)
    with pytest.raises(StaleCheckpointError, match="committed nothing yet"):
        plan_job(other, storage)
    monkeypatch.undo()
    assert load_input_schema(JobStorage.for_spec(spec)).names == ["id", "value", "text"]
    ShardRunner(spec).run(plan_job(spec).pending[0], new_attempt())
    assert set(sink_ids(spec.sink_root)) == set(range(100))


def superseded_setup(spec):
    """A shard task of plan P1 (100 rows a shard) still computing when P2 (50 a shard) replaces it."""
    old = plan_job(spec)
    shard = old.pending[0]
    attempt = new_attempt("dag/run/shard/0", plan_id=old.plan.plan_id)
    newer = make_spec(spec.source, spec.sink, rows_per_shard=50, predictor_kwargs=spec.predictor_kwargs)
    return shard, attempt, newer


def test_work_of_a_superseded_plan_cannot_commit_into_the_new_one(spec):
    shard, attempt, newer = superseded_setup(spec)
    assert len(plan_job(newer).pending) == 8  # the replan: nothing was committed under P1
    with pytest.raises(CommitError, match="replaced by a plan without this shard.*withdrawn"):
        ShardRunner(spec).run(shard, attempt)
    storage = JobStorage.for_spec(newer)
    assert shard.shard_id not in storage.committed_ids() and staged_on_disk(spec) == []
    run_all(newer)
    finalize_job(newer)
    assert sink_ids(spec.sink_root) == list(range(380))


def test_a_commit_that_lands_during_the_replan_is_withdrawn_by_it(spec, monkeypatch):
    """P1's attempt commits after the replan listed the sentinels but before it wrote P2's
    id (so the attempt still saw P1 standing): the replan finds it when it lists again."""
    shard, attempt, newer = superseded_setup(spec)
    storage = JobStorage.for_spec(newer)
    real_committed = JobStorage.committed_ids
    listings = []

    def commit_lands_after_first_listing(self):
        found = real_committed(self)
        listings.append(len(found))
        if len(listings) == 1:
            assert ShardRunner(spec).run(shard, attempt).status == "computed"
        return found

    monkeypatch.setattr(JobStorage, "committed_ids", commit_lands_after_first_listing)
    job = plan_job(newer)
    monkeypatch.undo()
    assert listings == [0, 1]
    assert any("superseded plan" in n for n in job.notes), job.notes
    assert shard.shard_id not in storage.committed_ids() and sink_ids(spec.sink_root) == []
    run_all(newer)
    finalize_job(newer)
    assert sink_ids(spec.sink_root) == list(range(380))


# -- 3. the commit path ----------------------------------------------------------------------
def test_an_attempt_recognises_its_own_sentinel_after_a_retried_create(spec, monkeypatch):
    """NFS retries a ``link`` whose reply was lost: the retry answers EEXIST to its own create."""
    storage = JobStorage.for_spec(spec)
    real_create = type(storage.checkpoint).create_exclusive

    def create_retried_underneath(self, path, data):
        assert real_create(self, path, data)  # the first try lands ...
        return real_create(self, path, data)  # ... the retry reports "exists"

    monkeypatch.setattr(type(storage.checkpoint), "create_exclusive", create_retried_underneath)
    results = run_all(spec)
    assert {r.status for r in results} == {"computed"}
    monkeypatch.undo()
    finalize_job(spec)
    assert sink_ids(spec.sink_root) == list(range(380))


def test_a_publish_that_finds_its_data_gone_fails_the_attempt(spec):
    storage = JobStorage.for_spec(spec)
    shard = plan_job(spec).pending[0]
    staged = stage(storage, shard)
    os.remove(staged.handle["staged"])  # a clean-up took it between the part's finish and the commit
    with pytest.raises(CommitError, match="staged data is gone.*Retry the task"):
        commit_shard(storage, shard, staged, rows_in=1, rows_out=1, lines=1, attempt=new_attempt())
    # the retry quarantines that sentinel and computes the shard
    assert ShardRunner(spec).run(shard, new_attempt()).status == "computed"
    assert check_shard(storage, shard).committed


def test_a_publish_that_keeps_failing_does_not_wedge_the_plan(spec, tmp_path):
    """A commit whose staged data sits where it can never be renamed from (another
    filesystem: EXDEV, every time), as a sink moved to another mount leaves it."""
    storage = JobStorage.for_spec(spec)
    shard = plan_job(spec).pending[0]
    elsewhere = f"/dev/shm/abp-{tmp_path.name}-{shard.shard_id}.inprogress"
    open(elsewhere, "wb").write(b"staged bytes")
    handle = {"staged": elsewhere, "final": storage.part_path(shard.shard_id)}
    sentinel = json.dumps({"schema_version": 1, "shard_id": shard.shard_id, "part": storage.part_name(shard.shard_id),
                           "bytes": 12, "rows_out": 1, "spec_fingerprint": spec.fingerprint,
                           "input_fingerprint": shard.input_fingerprint, "staged": handle, "sink": spec.sink_root})
    storage.checkpoint.create_exclusive(storage.sentinel_path(shard.shard_id), sentinel.encode())
    try:
        with pytest.raises(StorageError, match="publishing .* failed: Invalid cross-device link"):
            storage.sink.staged_from(handle).publish()
        job = plan_job(spec)  # not wedged: the sentinel is quarantined, the shard planned again
    finally:
        os.remove(elsewhere)
    assert shard.shard_id in {s.shard_id for s in job.pending}
    assert any("cannot be published" in n for n in job.notes), job.notes
    run_all(spec)
    finalize_job(spec)
    assert sink_ids(spec.sink_root) == list(range(380))


def test_quarantine_keeps_a_sentinel_committed_in_between(spec, monkeypatch):
    run_all(spec)
    storage = JobStorage.for_spec(spec)
    shard = plan_job(spec).plan.shards[0]
    path = storage.sentinel_path(shard.shard_id)
    valid = open(path, "rb").read()
    open(path, "wb").write(b"{broken")
    real_write = type(storage.checkpoint).write_atomic

    def commit_lands_meanwhile(self, target, data):
        real_write(self, target, data)
        if "quarantine" in target:  # after the broken sentinel was read, before it is removed
            os.remove(path)
            storage.checkpoint.create_exclusive(path, valid)

    monkeypatch.setattr(type(storage.checkpoint), "write_atomic", commit_lands_meanwhile)
    note = quarantine(storage, shard.shard_id, "not valid JSON")
    assert "changed meanwhile" in note and open(path, "rb").read() == valid
    assert not os.listdir(os.path.join(spec.checkpoint_root, "quarantine"))


def test_a_sentinel_of_a_newer_schema_fails_closed_and_is_kept(spec):
    run_all(spec)
    storage = JobStorage.for_spec(spec)
    shard = plan_job(spec).plan.shards[1]
    path = storage.sentinel_path(shard.shard_id)
    newer = {**json.load(open(path)), "schema_version": commit_mod.SENTINEL_SCHEMA_VERSION + 1}
    open(path, "w").write(json.dumps(newer))
    with pytest.raises(StaleCheckpointError, match="newer than this provider knows.*Upgrade"):
        check_shard(storage, shard)
    with pytest.raises(StaleCheckpointError):
        finalize_job(spec)
    assert json.load(open(path)) == newer


def test_local_storage_failures_are_batch_errors_that_say_what_to_do(tmp_path, jsonl_source):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the sink's parent should be")
    spec = make_spec(jsonl_source, str(blocker / "out"))
    with pytest.raises(BatchError, match=r"not-a-dir/out/_checkpoint/\S+ failed: Not a directory.*then clear the task"):
        plan_job(spec)


def test_reset_and_withdraw_take_the_rejected_rows_file_with_the_shard(spec, tmp_path):
    always = tmp_path / "reject"
    always.touch()
    kwargs = {"fail_marker": str(always), "fail_mod": 97}
    skipping = make_spec(spec.source, spec.sink, bad_rows="skip", predictor_kwargs=kwargs)
    run_all(skipping)
    finalize_job(skipping)
    rejected_dir = os.path.join(spec.sink_root, "_rejected")
    assert len([n for n in os.listdir(rejected_dir) if n.endswith(".jsonl")]) == 3  # ids 0 and 97, 194, 291: three shards
    fresh = make_spec(spec.source, spec.sink, bad_rows="skip", predictor_kwargs=kwargs, resume=False)
    plan_job(fresh, reset_key="run-2")
    assert [n for n in os.listdir(rejected_dir) if n.endswith(".jsonl")] == []
    assert sink_ids(spec.sink_root) == []


# -- 4. a shard recomputed without bad rows leaves no rejected-rows file of its earlier commit -----
def rejected_once_then_quarantined(spec, tmp_path):
    """A skip job whose predictor fails on ids divisible by 97 (a flaky remote model, say):
    shard 0 rejects ids 0 and 97. Its part is then damaged, so finalize quarantines its sentinel, and
    the predictor is healthy again: the rerun recomputes shard 0 rejecting nothing."""
    flaky = tmp_path / "predictor-fails"
    flaky.touch()
    kwargs = {"fail_marker": str(flaky), "fail_mod": 97, "calls_log": spec.predictor_kwargs["calls_log"]}
    skipping = make_spec(spec.source, spec.sink, bad_rows="skip", predictor_kwargs=kwargs)
    run_all(skipping)
    storage = JobStorage.for_spec(skipping)
    shard = plan_job(skipping).plan.shards[0]
    stale = storage.rejected_path(shard.shard_id)
    assert [json.loads(line)["row"]["id"] for line in open(stale)] == [0, 97]
    part = storage.part_path(shard.shard_id)
    open(part, "ab").write(b"damaged")
    with pytest.raises(IncompleteJobError, match="quarantined"):
        finalize_job(skipping)
    flaky.unlink()
    return skipping, storage, shard, stale


def rejected_ids(spec) -> list[int]:
    folder = os.path.join(spec.sink_root, "_rejected")
    names = [n for n in os.listdir(folder) if n.endswith(".jsonl")] if os.path.isdir(folder) else []
    return sorted(json.loads(line)["row"]["id"] for n in names for line in open(os.path.join(folder, n)))


def assert_each_row_once(spec, manifest):
    """Every input row once, in a part or in _rejected/, and _SUCCESS counts the same."""
    assert rejected_ids(spec) == [194, 291]  # the other shards' rejected rows; 0 and 97 are in shard 0's part now
    assert sorted(sink_ids(spec.sink_root) + rejected_ids(spec)) == list(range(380))
    assert manifest["rows_rejected"] == 2 and manifest["rows_out"] == 378


def test_a_recompute_that_rejects_nothing_removes_the_earlier_rejected_rows(spec, tmp_path):
    skipping, storage, shard, stale = rejected_once_then_quarantined(spec, tmp_path)
    assert [s.shard_id for s in plan_job(skipping).pending] == [shard.shard_id]
    run_all(skipping)
    assert not os.path.exists(stale)
    assert_each_row_once(spec, finalize_job(skipping))


@pytest.mark.parametrize("point", ["before_publish", "before_publish_rejected"])
def test_a_kill_while_recomputing_without_bad_rows_then_rerun_ends_clean(spec, tmp_path, point):
    """Killed after the sentinel (no rows rejected) is created: before the part is published
    (the rerun's plan rolls the commit forward) or after it (finalize finds the stale file)."""
    skipping, storage, shard, stale = rejected_once_then_quarantined(spec, tmp_path)
    marker = tmp_path / "fired"
    proc = run_killed_at(skipping, point, marker)
    assert proc.returncode == -9 and marker.exists(), proc.stderr.decode()[-2000:]
    assert os.path.exists(stale)
    run_all(skipping)
    manifest = finalize_job(skipping, orphan_grace_s=0)
    assert not os.path.exists(stale)
    assert_each_row_once(spec, manifest)
