"""A replica that cannot build its predictor answers the lease with its error at once (on a
local Ray), instead of dying in its constructor, which left the pool re-creating replicas that
die until the lease timed out. The caller stops the replica, and a secret in the error is
redacted as in any other predictor error."""

from __future__ import annotations

import time
import traceback

import pytest

from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import plan_job
from airflow_batch_provider.core.errors import PredictorError
from airflow_batch_provider.core.ray.pool import ReplicaPool, find_replica
from tests.helpers import make_spec

SECRET = "sk-live-0a1b2c3d4e5f60718293"


def test_an_unimportable_predictor_fails_the_lease_at_once_saying_how_to_ship_it(local_ray, jsonl_source, tmp_path):
    spec = make_spec(jsonl_source, str(tmp_path / "out"), predictor="no_such_pkg.model:Model", num_replicas=1)
    pool = ReplicaPool(spec)
    started = time.monotonic()
    with pytest.raises(PredictorError) as caught:
        pool.submit(plan_job(spec).pending[:1], new_attempt(), lease_timeout_s=120)
    assert time.monotonic() - started < 60  # the replica's answer, not the lease timeout
    message = str(caught.value)
    assert "cannot import module 'no_such_pkg.model'" in message and "runtime_env" in message and "working_dir" in message
    assert find_replica(pool.name(0)) is None  # stopped: it would hold its CPU and answer everyone the same


def test_a_load_error_naming_a_secret_reaches_the_caller_redacted(local_ray, jsonl_source, tmp_path):
    spec = make_spec(jsonl_source, str(tmp_path / "out"), predictor="tests.predictors:LeakyKeyed", num_replicas=1,
                     predictor_kwargs={"fail_on_load": True}, predictor_secrets={"api_key": "var:model_api_key"})
    pool = ReplicaPool(spec, secrets={"api_key": SECRET})
    with pytest.raises(PredictorError) as caught:
        pool.submit(plan_job(spec).pending[:1], new_attempt(), lease_timeout_s=120)
    text = "".join(traceback.format_exception(caught.value))
    assert "could not load predictor='tests.predictors:LeakyKeyed': ConnectionError" in text and "key=***" in text
    assert SECRET not in text


def test_a_local_working_dir_that_is_missing_here_is_refused_saying_where_it_must_be(local_ray, jsonl_source, tmp_path):
    from airflow_batch_provider.core.errors import BatchSpecError

    missing = str(tmp_path / "not-here")
    spec = make_spec(jsonl_source, str(tmp_path / "out"), predictor="tests.predictors:Doubler", runtime_env={"working_dir": missing})
    with pytest.raises(BatchSpecError, match="cannot be shipped to the Ray cluster.*wherever the job's tasks run") as caught:
        ReplicaPool(spec).start(wanted=1)
    assert missing in str(caught.value)
