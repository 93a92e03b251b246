"""``[batch_inference]``: the deployment's timeouts reach the core, and Airflow lists them."""

from __future__ import annotations

import pytest

from airflow_batch_provider.core import api
from airflow_batch_provider.get_provider_info import get_provider_info
from airflow_batch_provider.operators.batch import BatchShardOperator
from airflow_batch_provider.settings import configured, tunables

SPEC = {"source": "/in/*.jsonl", "sink": "/out", "predictor": "tests.predictors:Doubler"}


def test_defaults_without_configuration():
    assert tunables() == api.Tunables()
    assert configured() == {}


def test_options_from_the_environment_reach_the_replicas_and_the_task(monkeypatch):
    monkeypatch.setenv("AIRFLOW__BATCH_INFERENCE__REPLICA_IDLE_TIMEOUT_S", "45")
    monkeypatch.setenv("AIRFLOW__BATCH_INFERENCE__CANCEL_GRACE_S", "3")
    monkeypatch.setenv("AIRFLOW__BATCH_INFERENCE__LEASE_TIMEOUT_S", "900")
    assert tunables().replica_idle_timeout_s == 45.0 and tunables().lease_timeout_s == 900.0
    assert configured() == {"replica_idle_timeout_s": "45", "cancel_grace_s": "3", "lease_timeout_s": "900"}
    task = BatchShardOperator(task_id="shard", spec=SPEC, work_unit={"label": "s0", "shards": []})
    pool = task.replicas  # built lazily: Ray is not touched
    assert (pool.idle_timeout_s, pool.cancel_grace_s) == (45.0, 3.0)


def test_a_bad_value_names_the_section_and_the_option(monkeypatch):
    monkeypatch.setenv("AIRFLOW__BATCH_INFERENCE__CONNECT_TIMEOUT_S", "soon")
    with pytest.raises(api.BatchSpecError, match=r"\[batch_inference\].*connect_timeout_s.*'soon'"):
        tunables()


def test_provider_info_declares_every_option_with_its_default():
    section = get_provider_info()["config"]["batch_inference"]
    assert set(section["options"]) == set(api.Tunables.names())
    assert section["options"]["replica_idle_timeout_s"]["default"] == str(api.Tunables().replica_idle_timeout_s)
    assert all(option["description"] for option in section["options"].values())


def test_the_reference_lists_every_setting_with_its_default():
    """docs/reference.md's Settings table is what an operator reads: it names every option and its default."""
    from pathlib import Path

    reference = (Path(__file__).parent.parent / "docs" / "reference.md").read_text()
    section = reference.split("## Settings", 1)[1].split("\n## ", 1)[0]
    defaults = api.Tunables()
    for name in api.Tunables.names():
        assert f"| `{name}` |" in section, name
        default = getattr(defaults, name)
        shown = "empty" if default is None else f"{default:g}"
        assert f"| `{name}` | {shown} |" in section, (name, shown)
