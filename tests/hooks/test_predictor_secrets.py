"""Resolving ``predictor_secrets`` from Airflow registers each value with Airflow's masker."""

from __future__ import annotations

import logging
import uuid

from airflow.sdk.log import _secrets_masker

from airflow_batch_provider.hooks.predictor_secrets import resolve_predictor_secrets


def test_resolved_secrets_are_masked_in_log_records(monkeypatch):
    value = f"model-api-{uuid.uuid4().hex}"
    monkeypatch.setenv("AIRFLOW_VAR_ABP_MODEL_ENDPOINT_CONFIG", value)  # a name Airflow does not mask by itself
    assert resolve_predictor_secrets({"api_key": "var:abp_model_endpoint_config"}) == {"api_key": value}
    masker = _secrets_masker()
    monkeypatch.setattr(type(masker), "mask_secrets_in_logs", True)  # as in a task process
    record = logging.LogRecord("abp", logging.ERROR, __file__, 1, "403 Forbidden for url: %s",
                               (f"https://models.example/v1?key={value}",), None)
    masker.filter(record)  # the filter Airflow's task logging runs every record through
    assert value not in record.getMessage() and "key=***" in record.getMessage()
