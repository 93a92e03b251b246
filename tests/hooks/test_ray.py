from __future__ import annotations

import asyncio
import json

import pytest

from airflow_batch_provider.exceptions import BatchInferenceFailure
from airflow_batch_provider.hooks.ray import RayHook


def no_default_connections(monkeypatch):
    for name in ("AIRFLOW_CONN_RAY_BATCH_DEFAULT", "AIRFLOW_CONN_RAY_DEFAULT"):
        monkeypatch.delenv(name, raising=False)


def test_connection_gives_address_and_token(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_RAY_TEST",
        json.dumps({"conn_type": "ray_batch", "host": "10.1.2.3", "port": 6379, "password": "s3cret-token"}),
    )
    target = RayHook(ray_conn_id="ray_test").get_target()
    assert target.address == "10.1.2.3:6379"
    assert target.token == "s3cret-token"
    assert "s3cret" not in repr(RayHook(ray_conn_id="ray_test").__dict__)


def test_ray_client_address_keeps_its_port(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RAY_TEST", json.dumps({"conn_type": "ray_batch", "host": "ray://head:10001", "port": 1}))
    assert RayHook(ray_conn_id="ray_test").get_target().address == "ray://head:10001"


def test_missing_connection_falls_back_to_ray_environment(monkeypatch):
    no_default_connections(monkeypatch)
    target = RayHook().get_target()
    assert target.address is None and target.token is None


def test_missing_connection_in_a_trigger_falls_back_too(monkeypatch):
    no_default_connections(monkeypatch)
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
    monkeypatch.setenv("AIRFLOW_CONN_RAY_TEST", json.dumps({"conn_type": "ray_batch", "host": "10.1.2.3", "extra": {"runtime_env": env}}))
    assert RayHook(ray_conn_id="ray_test").get_runtime_env() == env


def test_no_runtime_env_without_the_key_or_the_connection(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RAY_TEST", json.dumps({"conn_type": "ray_batch", "host": "10.1.2.3"}))
    assert RayHook(ray_conn_id="ray_test").get_runtime_env() is None
    no_default_connections(monkeypatch)
    assert RayHook().get_runtime_env() is None


def test_a_runtime_env_that_is_not_an_object_is_refused_naming_the_connection(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RAY_TEST", json.dumps({"conn_type": "ray_batch", "extra": {"runtime_env": ["pip"]}}))
    with pytest.raises(ValueError, match="'ray_test' connection holds runtime_env=list"):
        RayHook(ray_conn_id="ray_test").get_runtime_env()


# -- the connection type and id this provider had before (ray, ray_default) ---------------------
THEIRS = {"conn_type": "ray", "extra": {"address": "http://head:8265", "namespace": "ray", "verify": True}}


def test_the_connection_type_is_ray_batch_and_its_default_id_follows():
    assert (RayHook.conn_type, RayHook.default_conn_name) == ("ray_batch", "ray_batch_default")
    assert RayHook().ray_conn_id == "ray_batch_default"


def test_a_connection_of_the_old_type_ray_is_read_with_a_deprecation_warning(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RAY_OLD", json.dumps({"conn_type": "ray", "host": "10.1.2.3", "port": 6379, "password": "tok"}))
    with pytest.warns(DeprecationWarning, match=r"'ray_old' connection has type 'ray'.*set its connection type to 'ray_batch'"):
        target = RayHook(ray_conn_id="ray_old").get_target()
    assert (target.address, target.token) == ("10.1.2.3:6379", "tok")


def test_ray_default_is_read_when_no_ray_batch_default_exists(monkeypatch):
    no_default_connections(monkeypatch)
    env = {"env_vars": {"A": "1"}}
    monkeypatch.setenv("AIRFLOW_CONN_RAY_DEFAULT", json.dumps({"conn_type": "ray", "host": "head", "port": 6379, "extra": {"runtime_env": env}}))
    hook = RayHook()
    with pytest.warns(DeprecationWarning, match=r"no 'ray_batch_default' connection: the 'ray_default' connection is read instead.*"
                                                r"AIRFLOW_CONN_RAY_BATCH_DEFAULT.*'ray_batch'"):
        assert hook.get_target().address == "head:6379"
    assert hook.ray_conn_id == "ray_default"  # messages name the connection read
    with pytest.warns(DeprecationWarning):
        assert asyncio.run(RayHook().aget_target()).address == "head:6379"
    with pytest.warns(DeprecationWarning):
        assert RayHook().get_runtime_env() == env


def test_ray_batch_default_wins_over_ray_default_without_a_warning(monkeypatch, recwarn):
    monkeypatch.setenv("AIRFLOW_CONN_RAY_BATCH_DEFAULT", json.dumps({"conn_type": "ray_batch", "host": "new"}))
    monkeypatch.setenv("AIRFLOW_CONN_RAY_DEFAULT", json.dumps({"conn_type": "ray", "host": "old"}))
    assert RayHook().get_target().address == "new"
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning) and "ray" in str(w.message)]


def test_ray_conn_id_ray_default_reads_ray_batch_default_once_renamed(monkeypatch):
    """A DAG (or a trigger deferred before the upgrade) naming ray_default, whose connection was renamed."""
    monkeypatch.delenv("AIRFLOW_CONN_RAY_DEFAULT", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_RAY_BATCH_DEFAULT", json.dumps({"conn_type": "ray_batch", "host": "new"}))
    with pytest.warns(DeprecationWarning, match=r"ray_conn_id='ray_default' names no connection: the 'ray_batch_default' connection"):
        assert asyncio.run(RayHook(ray_conn_id="ray_default").aget_target()).address == "new"


def test_only_the_default_ids_stand_in_for_each_other(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RAY_DEFAULT", json.dumps({"conn_type": "ray", "host": "old"}))
    monkeypatch.delenv("AIRFLOW_CONN_RAY_GPU", raising=False)
    assert RayHook(ray_conn_id="ray_gpu").get_target().address is None


def test_a_connection_of_airflows_ray_provider_is_refused_naming_it(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RAY_JOBS", json.dumps(THEIRS))
    with pytest.raises(BatchInferenceFailure, match=r"'ray_jobs' connection is apache-airflow-providers-ray's \(type 'ray' with address, "
                                                    r"namespace, verify in its extra\).*Create a 'ray_batch' connection"):
        RayHook(ray_conn_id="ray_jobs").get_target()
    with pytest.raises(BatchInferenceFailure, match="apache-airflow-providers-ray's"):
        asyncio.run(RayHook(ray_conn_id="ray_jobs").aget_target())


def test_airflows_ray_provider_ray_default_is_not_taken_for_ours(monkeypatch, recwarn):
    """With both providers installed, their ``ray_default`` (a dashboard URL) is left alone: no
    ray_batch_default means Ray's environment or a local Ray, as without any connection."""
    no_default_connections(monkeypatch)
    monkeypatch.setenv("AIRFLOW_CONN_RAY_DEFAULT", json.dumps(THEIRS))
    target = RayHook().get_target()
    assert target.address is None and target.token is None
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning) and "ray" in str(w.message)]
