"""The DAG author's BatchSpec: the core's spec plus the Airflow connection for S3."""

from __future__ import annotations

import pytest

from airflow_batch_provider import BatchSpec
from airflow_batch_provider.core.api import BatchSpecError
from airflow_batch_provider.core.spec import JobSpec
from airflow_batch_provider.spec import split_conn_id


def test_conn_id_in_url_is_stripped_and_becomes_storage_conn_id():
    assert split_conn_id("s3://my_minio@bucket/a/b") == ("s3://bucket/a/b", "my_minio")
    assert split_conn_id("s3://bucket/a") == ("s3://bucket/a", None)
    assert split_conn_id("/tmp/x@y") == ("/tmp/x@y", None)
    spec = BatchSpec(source="s3://lake@b/in/*.jsonl", sink="s3://lake@b/out", predictor="tests.predictors:Doubler")
    assert (spec.source, spec.sink, spec.storage_conn_id) == ("s3://b/in/*.jsonl", "s3://b/out", "lake")
    with pytest.raises(ValueError, match="different connections"):
        BatchSpec(source="s3://a@b/in.jsonl", sink="s3://b/out", predictor="m:C", storage_conn_id="other")


def test_the_core_gets_the_same_job_without_the_connection():
    spec = BatchSpec(source="s3://lake@b/in/*.jsonl", sink="s3://b/out", predictor="tests.predictors:Doubler", rows_per_shard=7)
    core = spec.core()
    assert type(core) is JobSpec and not hasattr(core, "storage_conn_id")
    assert core.fingerprint == spec.fingerprint and core.rows_per_shard == 7 and core.source == "s3://b/in/*.jsonl"
    assert BatchSpec.from_dict(spec.to_dict()) == spec  # what travels through XCom and templates
    with pytest.raises(BatchSpecError, match="storage_conn_id"):
        BatchSpec(source="/in.jsonl", sink="/out", predictor="m:C", storage_conn_id="")


def test_importing_the_spec_loads_neither_airflow_nor_ray():
    """DAG files import BatchSpec at every parse: it must stay light (the core's spec only)."""
    import subprocess
    import sys

    code = "import sys, airflow_batch_provider as p; p.BatchSpec; print(sorted(m for m in ('ray', 'airflow', 'pyarrow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_literal_secret_in_predictor_secrets_is_refused_without_echoing_it():
    literal = "sk-live-9Qz:7f3a9c0e1b2d"  # the key itself, pasted where its reference belongs
    with pytest.raises(BatchSpecError, match=r"predictor_secrets\['api_key'\] is not a reference.*'conn:<conn_id>'") as caught:
        BatchSpec(source="/in.jsonl", sink="/out", predictor="m:P", predictor_secrets={"api_key": literal})
    assert literal not in str(caught.value) and "sk-live" not in str(caught.value)


def test_the_deprecated_num_workers_reaches_the_core_as_num_replicas():
    with pytest.warns(DeprecationWarning, match="'num_workers' is deprecated, use 'num_replicas'") as warned:
        spec = BatchSpec(source="/in.jsonl", sink="/out", predictor="m:C", num_workers=2)
    assert warned[0].filename == __file__
    assert spec.num_replicas == 2 and spec.core().num_replicas == 2
    with pytest.warns(DeprecationWarning, match="use 'num_replicas'"):
        assert BatchSpec.from_dict({"source": "/in.jsonl", "sink": "/out", "predictor": "m:C", "num_workers": 2}) == spec
    with pytest.raises(BatchSpecError, match="give only 'num_replicas'"):
        BatchSpec(source="/in.jsonl", sink="/out", predictor="m:C", num_workers=2, num_replicas=3)
