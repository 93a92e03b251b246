"""The aws connection -> storage options, and the connection named in an s3:// URL."""

from __future__ import annotations

import json

import numpy as np
import pytest

from airflow_batch_provider import BatchSpec
from airflow_batch_provider.core.errors import PredictorError
from airflow_batch_provider.hooks.storage import storage_options_for
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


def test_local_paths_need_no_connection():
    spec = BatchSpec(source="/data/in.jsonl", sink="/data/out", predictor="m:C")
    assert storage_options_for(spec) is None


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
