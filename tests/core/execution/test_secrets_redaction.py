"""A predictor's error that quotes its secret (an HTTP client error naming ``...?key=<secret>``)
never carries the secret into the sink or the errors the core raises (core/redaction.py)."""

from __future__ import annotations

import os
import traceback

import pytest

from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.errors import BadRowLimitError, PredictorFailedError
from airflow_batch_provider.core.execution.runner import ShardRunner
from airflow_batch_provider.core.redaction import Redactor, redact
from airflow_batch_provider.core.spec import JobSpec
from tests.helpers import make_spec

SECRET = "sk-live-7f3a9c0e1b2d4f6a8c"


def leaky_spec(source, sink, **fields) -> JobSpec:
    """A predictor whose errors quote its secret ``api_key``, as HTTP clients quote the URL they called."""
    return make_spec(source, sink, predictor="tests.predictors:LeakyKeyed", predictor_secrets={"api_key": "var:model_api_key"}, **fields)


def sink_text(root: str) -> str:
    """Every file under the sink (parts, _rejected, checkpoint, _SUCCESS), as text."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            found.append(open(os.path.join(folder, name), "rb").read().decode("utf-8", "replace"))
    return "\n".join(found)


def test_rejected_rows_name_the_error_without_the_secret(tmp_path, jsonl_source):
    spec = leaky_spec(jsonl_source, str(tmp_path / "out"), bad_rows="skip")
    runner = ShardRunner(spec, secrets={"api_key": SECRET})
    for shard in plan_job(spec).pending:
        runner.run(shard, new_attempt())
    manifest = finalize_job(spec)
    rejected_dir = os.path.join(spec.sink_root, "_rejected")
    rejected = "".join(open(os.path.join(rejected_dir, n)).read() for n in sorted(os.listdir(rejected_dir)) if n.endswith(".jsonl"))
    assert manifest["rows_rejected"] == 4 and rejected.count("Forbidden for url") == 4  # ids 0, 97, 194, 291
    assert "key=***&id=97" in rejected
    assert SECRET not in sink_text(spec.sink_root)


def test_the_shards_error_and_its_traceback_hold_no_secret(tmp_path, jsonl_source):
    spec = leaky_spec(jsonl_source, str(tmp_path / "out"))
    shard = plan_job(spec).pending[0]
    with pytest.raises(PredictorFailedError, match=r"Forbidden for url: .*key=\*\*\*&id=0 on shard") as caught:
        ShardRunner(spec, secrets={"api_key": SECRET}).run(shard, new_attempt())
    assert SECRET not in "".join(traceback.format_exception(caught.value))


def test_a_shard_over_its_bad_row_limit_names_the_errors_without_the_secret(tmp_path, jsonl_source):
    spec = leaky_spec(jsonl_source, str(tmp_path / "out"), bad_rows="skip", max_bad_rows=1)
    shard = plan_job(spec).pending[0]  # ids 0..99: 0 and 97 are rejected, one over the limit
    with pytest.raises(BadRowLimitError, match=r"key=\*\*\*") as caught:
        ShardRunner(spec, secrets={"api_key": SECRET}).run(shard, new_attempt())
    assert SECRET not in "".join(traceback.format_exception(caught.value))
    assert SECRET not in sink_text(spec.sink_root)


def test_a_predictor_that_fails_to_load_is_reported_without_the_secret(tmp_path, jsonl_source):
    spec = leaky_spec(jsonl_source, str(tmp_path / "out"), predictor_kwargs={"fail_on_load": True})
    with pytest.raises(Exception, match=r"load\?key=\*\*\*") as caught:
        ShardRunner(spec, secrets={"api_key": SECRET})
    assert SECRET not in "".join(traceback.format_exception(caught.value))


def test_redactor_replaces_every_value_and_the_longest_first():
    assert redact("a=s3cr3t b=s3cr3t-and-more c=other", ["s3cr3t", "s3cr3t-and-more"]) == "a=*** b=*** c=other"
    err = ValueError("bad key s3cr3t")
    clean = Redactor(["s3cr3t"]).error(err)
    assert type(clean) is ValueError and str(clean) == "bad key ***" and clean.__cause__ is None
    untouched = KeyError("nothing secret")
    assert Redactor(["s3cr3t"]).error(untouched) is untouched
