"""The aws connection -> storage options (through the amazon provider), and the connection named in an s3:// URL.

Connections are real ``AIRFLOW_CONN_<ID>`` environment variables read by the amazon
provider's AwsBaseHook; nothing of the hook is mocked.
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
from airflow.sdk.exceptions import AirflowNotFoundException, AirflowOptionalProviderFeatureException

from airflow_batch_provider import BatchSpec
from airflow_batch_provider.core.errors import PredictorError
from airflow_batch_provider.hooks.storage import options_for_connection, storage_options_for
from airflow_batch_provider.predictors.linear import LinearModel

CONN = {
    "conn_type": "aws",
    "login": "AKIDEXAMPLE",
    "password": "wJalrXUtnFEMI-secret",
    "extra": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
}


def test_conn_id_from_the_url_selects_the_connection(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_ABP_LAKE", json.dumps(CONN))
    spec = BatchSpec(source="s3://abp_lake@bucket/in/", sink="s3://abp_lake@bucket/out", predictor="m:C", source_format="jsonl")
    assert spec.storage_conn_id == "abp_lake"
    assert storage_options_for(spec) == {
        "key": "AKIDEXAMPLE",
        "secret": "wJalrXUtnFEMI-secret",
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    assert CONN["password"] not in json.dumps(spec.to_dict())  # the spec only names the connection


def _s3_spec(conn_id: str) -> BatchSpec:
    return BatchSpec(source=f"s3://{conn_id}@bucket/in/", sink=f"s3://{conn_id}@bucket/out", predictor="m:C", source_format="jsonl")


@pytest.fixture
def no_ambient_aws(monkeypatch, tmp_path):
    """No AWS credentials or region from this machine: only what the connection says counts."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path


def test_aws_connection_gives_key_secret_endpoint_and_region(monkeypatch, no_ambient_aws):
    monkeypatch.setenv("AIRFLOW_CONN_ABP_S3", json.dumps({
        "conn_type": "aws", "login": "AK", "password": "SK",
        "extra": {"endpoint_url": "http://127.0.0.1:9999", "region_name": "eu-west-1"},
    }))
    assert storage_options_for(_s3_spec("abp_s3")) == {
        "key": "AK", "secret": "SK", "endpoint_url": "http://127.0.0.1:9999", "client_kwargs": {"region_name": "eu-west-1"},
    }


def test_session_token_in_extra_gives_token(monkeypatch, no_ambient_aws):
    monkeypatch.setenv("AIRFLOW_CONN_ABP_S3", json.dumps({
        "conn_type": "aws", "login": "ASIAEXAMPLE", "password": "temp-secret",
        "extra": {"aws_session_token": "session-token-from-sts", "region_name": "us-west-2"},
    }))
    assert storage_options_for(_s3_spec("abp_s3")) == {
        "key": "ASIAEXAMPLE", "secret": "temp-secret", "token": "session-token-from-sts",
        "client_kwargs": {"region_name": "us-west-2"},
    }


def test_profile_named_in_the_connection(monkeypatch, no_ambient_aws):
    (no_ambient_aws / "no-credentials").write_text("[lake]\naws_access_key_id = AKPROFILE\naws_secret_access_key = SKPROFILE\n")
    (no_ambient_aws / "no-config").write_text("[profile lake]\nregion = ap-southeast-2\n")
    monkeypatch.setenv("AIRFLOW_CONN_ABP_S3", json.dumps({"conn_type": "aws", "extra": {"profile_name": "lake"}}))
    assert options_for_connection("abp_s3") == {"key": "AKPROFILE", "secret": "SKPROFILE", "client_kwargs": {"region_name": "ap-southeast-2"}}


def test_s3_service_config_endpoint(monkeypatch, no_ambient_aws):
    monkeypatch.setenv("AIRFLOW_CONN_ABP_S3", json.dumps({
        "conn_type": "aws", "login": "AK", "password": "SK",
        "extra": {"endpoint_url": "http://other:1", "service_config": {"s3": {"endpoint_url": "http://s3-store:8333"}}},
    }))
    assert options_for_connection("abp_s3") == {"key": "AK", "secret": "SK", "endpoint_url": "http://s3-store:8333"}


def test_connection_without_credentials_in_an_environment_without_any(monkeypatch, no_ambient_aws):
    monkeypatch.setenv("AIRFLOW_CONN_ABP_S3", json.dumps({"conn_type": "aws", "extra": {"endpoint_url": "http://127.0.0.1:9999"}}))
    assert options_for_connection("abp_s3") == {"endpoint_url": "http://127.0.0.1:9999"}


def test_a_named_connection_that_does_not_exist_is_an_error(monkeypatch):
    """Not a silent fall-back to the host's own credentials (the worker's or api-server's role)."""
    monkeypatch.delenv("AIRFLOW_CONN_ABP_NOWHERE", raising=False)
    with pytest.raises(AirflowNotFoundException, match="connection 'abp_nowhere' .* does not exist"):
        storage_options_for(_s3_spec("abp_nowhere"))
    with pytest.raises(AirflowNotFoundException, match="'abp_nowhere'"):
        options_for_connection("abp_nowhere")


def test_without_aws_default_an_unnamed_connection_leaves_boto3_its_default_chain(monkeypatch, caplog):
    monkeypatch.delenv("AIRFLOW_CONN_AWS_DEFAULT", raising=False)
    spec = BatchSpec(source="s3://bucket/in/", sink="s3://bucket/out", predictor="m:C", source_format="jsonl")
    assert spec.storage_conn_id is None
    with caplog.at_level(logging.INFO, logger="airflow_batch_provider.hooks.storage"):
        assert storage_options_for(spec) == {}
    assert "No 'aws_default' connection" in caplog.text


def test_without_the_amazon_provider_the_error_names_the_extra(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_ABP_S3", json.dumps(CONN))
    monkeypatch.setitem(sys.modules, "airflow.providers.amazon.aws.hooks.base_aws", None)  # import fails as if not installed
    with pytest.raises(AirflowOptionalProviderFeatureException, match=r"pip install 'airflow-batch-provider\[s3\]'"):
        storage_options_for(_s3_spec("abp_s3"))


def test_local_paths_need_no_connection():
    spec = BatchSpec(source="/data/in.jsonl", sink="/data/out", predictor="m:C")
    assert storage_options_for(spec) is None


DEFAULT_CONN = {"conn_type": "aws", "login": "AKDEFAULT", "password": "SKDEFAULT", "extra": {"region_name": "us-east-2"}}


@pytest.mark.parametrize("sink, checkpoint_dir, conn_id, aws_default, expected", [
    ("/data/out", None, None, True, None),  # local disk: no options, no connection read
    ("s3://bucket/out", None, "abp_s3", True, {"key": "AKIDEXAMPLE", "secret": "wJalrXUtnFEMI-secret",
                                               "endpoint_url": "http://127.0.0.1:9000",
                                               "client_kwargs": {"region_name": "eu-west-1"}}),
    ("s3://bucket/out", None, None, True, {"key": "AKDEFAULT", "secret": "SKDEFAULT", "client_kwargs": {"region_name": "us-east-2"}}),
    ("s3://bucket/out", None, None, False, {}),  # no aws_default either: boto3's default chain
    ("/data/out", "s3a://bucket/checkpoint", None, True, {"key": "AKDEFAULT", "secret": "SKDEFAULT",
                                                          "client_kwargs": {"region_name": "us-east-2"}}),
])
def test_the_tasks_the_status_page_and_the_cli_resolve_the_same_options(monkeypatch, no_ambient_aws, sink, checkpoint_dir,
                                                                         conn_id, aws_default, expected):
    """One rule for the three readers of a sink: the named connection, else aws_default, else
    boto3's chain (the CLI once used the AWS environment without --conn-id, ignoring aws_default)."""
    from airflow_batch_provider import cli
    from airflow_batch_provider.plugins import sink_status as page

    monkeypatch.setenv("AIRFLOW_CONN_ABP_S3", json.dumps(CONN))
    if aws_default:
        monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(DEFAULT_CONN))
    else:
        monkeypatch.delenv("AIRFLOW_CONN_AWS_DEFAULT", raising=False)
    spec = BatchSpec(source="/data/in.jsonl", sink=sink, checkpoint_dir=checkpoint_dir, storage_conn_id=conn_id, predictor="m:C")
    page_read = {}
    monkeypatch.setattr(page.api, "sink_status", lambda sink, checkpoint_dir, options, **_: page_read.setdefault("options", options))
    page._status(spec)

    tasks = storage_options_for(spec)
    assert tasks == expected
    assert page_read["options"] == tasks
    assert cli.storage_options(sink, checkpoint_dir, conn_id) == tasks


def test_linear_model_scores_and_names_missing_columns():
    model = LinearModel(weights={"a": 2.0, "b": -1.0}, intercept=0.5, keep_columns=["id"])
    out = model({"id": np.array([1, 2]), "a": np.array([1.0, 2.0]), "b": np.array([3, 0])})
    np.testing.assert_allclose(out["score"], [2.0 - 3.0 + 0.5, 4.0 + 0.5])
    assert list(out) == ["id", "score"]
    logistic = LinearModel(weights={"a": 1.0}, link="logistic", output_column="p")
    np.testing.assert_allclose(logistic({"a": np.array([0.0])})["p"], [0.5])
    with pytest.raises(PredictorError, match=r"column\(s\) \['b', 'id'\].*it has \['a'\]"):
        model({"a": np.array([1.0])})
    with pytest.raises(PredictorError, match="link="):
        LinearModel(weights={"a": 1.0}, link="probit")
