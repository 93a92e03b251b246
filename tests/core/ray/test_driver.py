"""RayDriver.for_target: which Ray a trigger follows a shard's call on.

A target without an address means RAY_ADDRESS, else the Ray this process runs. A child
process must never start a Ray of its own (it would hold none of the task's replicas and
report every call lost), so the parent resolves the address and answers in-process when it
is itself connected to that Ray (``airflow dags test`` runs triggers inline).
"""

from __future__ import annotations

import pytest

from airflow_batch_provider.core.errors import RayWorkError
from airflow_batch_provider.core.ray import driver as driver_mod
from airflow_batch_provider.core.ray.connection import RayTarget
from airflow_batch_provider.core.ray.driver import InProcessDriver, RayDriver
from airflow_batch_provider.core.spec import JobSpec

SPEC = JobSpec(source="/in/*.jsonl", sink="/out", predictor="tests.predictors:Doubler").to_dict()


@pytest.mark.parametrize("ray_address", [None, "local"])
def test_no_cluster_to_follow_is_refused_with_what_to_set(monkeypatch, ray_address):
    monkeypatch.setattr(driver_mod, "_connected_to", lambda address: False)
    if ray_address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", ray_address)
    with pytest.raises(RayWorkError, match="RAY_ADDRESS"):
        RayDriver.for_target(RayTarget())


def test_ray_address_and_token_of_the_environment_reach_the_child(monkeypatch):
    started = []
    monkeypatch.setattr(driver_mod, "_connected_to", lambda address: False)
    monkeypatch.setattr(RayDriver, "__init__", lambda self, target: started.append(target))
    monkeypatch.setattr(RayDriver, "alive", True)
    monkeypatch.setattr(RayDriver, "_drivers", {})
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    RayDriver.for_target(RayTarget())
    assert started == [RayTarget(address="10.0.0.5:6379", token="env-token")]


def test_a_process_connected_to_ray_answers_in_process(local_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    driver = RayDriver.for_target(RayTarget())
    assert isinstance(driver, InProcessDriver)
    assert driver.call("status", SPEC, work={"worker": "abp-no-such-replica", "token": "t"}) == {"state": "LOST"}
    with pytest.raises(ValueError, match="serves"):
        driver.call("submit", SPEC)
