from __future__ import annotations

import asyncio
import json

import pytest

from airflow_batch_provider.hooks.ray import RayHook


def test_connection_gives_address_and_token(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_RAY_TEST",
        json.dumps({"conn_type": "ray", "host": "10.1.2.3", "port": 6379, "password": "s3cret-token"}),
    )
    target = RayHook(ray_conn_id="ray_test").get_target()
    assert target.address == "10.1.2.3:6379"
    assert target.token == "s3cret-token"
    assert "s3cret" not in repr(RayHook(ray_conn_id="ray_test").__dict__)


def test_ray_client_address_keeps_its_port(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RAY_TEST", json.dumps({"conn_type": "ray", "host": "ray://head:10001", "port": 1}))
    assert RayHook(ray_conn_id="ray_test").get_target().address == "ray://head:10001"


def test_missing_connection_falls_back_to_ray_environment(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_RAY_DEFAULT", raising=False)
    target = RayHook().get_target()
    assert target.address is None and target.token is None


def test_missing_connection_in_a_trigger_falls_back_too(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_RAY_DEFAULT", raising=False)
    target = asyncio.run(RayHook().aget_target())
    assert target.address is None and target.token is None


def test_other_lookup_errors_are_not_taken_for_a_missing_connection(monkeypatch):
    def unreachable(conn_id):
        raise ConnectionError("secrets backend unreachable")

    monkeypatch.setattr(RayHook, "get_connection", staticmethod(unreachable))
    with pytest.raises(ConnectionError):
        RayHook().get_target()


def test_runtime_env_comes_from_the_connections_extra(monkeypatch):
    env = {"working_dir": "s3://bucket/code.zip", "env_vars": {"HF_HOME": "/cache"}}
    monkeypatch.setenv("AIRFLOW_CONN_RAY_TEST", json.dumps({"conn_type": "ray", "host": "10.1.2.3", "extra": {"runtime_env": env}}))
    assert RayHook(ray_conn_id="ray_test").get_runtime_env() == env


def test_no_runtime_env_without_the_key_or_the_connection(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RAY_TEST", json.dumps({"conn_type": "ray", "host": "10.1.2.3"}))
    assert RayHook(ray_conn_id="ray_test").get_runtime_env() is None
    monkeypatch.delenv("AIRFLOW_CONN_RAY_DEFAULT", raising=False)
    assert RayHook().get_runtime_env() is None


def test_a_runtime_env_that_is_not_an_object_is_refused_naming_the_connection(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RAY_TEST", json.dumps({"conn_type": "ray", "extra": {"runtime_env": ["pip"]}}))
    with pytest.raises(ValueError, match="'ray_test' connection holds runtime_env=list"):
        RayHook(ray_conn_id="ray_test").get_runtime_env()
