"""``batch_inference()`` follows the DAG's own conventions."""

from __future__ import annotations

from datetime import timedelta

import pytest
from airflow.sdk import DAG

from airflow_batch_provider import BatchSpec, batch_inference

SPEC = BatchSpec(source="/in/*.jsonl", sink="/out", predictor="tests.predictors:Doubler")


def shard_task(group):
    return group.children["batch_inference.shard"]


def test_shard_tasks_take_the_dags_default_args_retries():
    with DAG("d", schedule=None, default_args={"retries": 0, "retry_delay": timedelta(seconds=7)}):
        group = batch_inference(SPEC)
    assert shard_task(group).partial_kwargs["retries"] == 0
    assert shard_task(group).partial_kwargs["retry_delay"] == timedelta(seconds=7)

    with DAG("d2", schedule=None, default_args={"retries": 5}):
        group = batch_inference(SPEC)
    assert shard_task(group).partial_kwargs["retries"] == 5


def test_shard_retries_overrides_the_dags_retries_for_shard_tasks_only():
    with DAG("d", schedule=None, default_args={"retries": 0}):
        group = batch_inference(SPEC, shard_retries=3)
    assert shard_task(group).partial_kwargs["retries"] == 3
    assert group.children["batch_inference.plan"].retries == 0


def test_release_workers_is_the_deprecated_name_of_release_replicas():
    with DAG("d", schedule=None):
        assert batch_inference(SPEC).children["batch_inference.finalize"].release_replicas is True
        with pytest.warns(DeprecationWarning, match="batch_inference: 'release_workers' is deprecated, use 'release_replicas'") as warned:
            group = batch_inference(SPEC, group_id="old", release_workers=False)
        assert warned[0].filename == __file__
        assert group.children["old.finalize"].release_replicas is False
        with pytest.raises(TypeError, match="give only 'release_replicas'"):
            batch_inference(SPEC, group_id="both", release_workers=False, release_replicas=False)


def test_batch_inference_takes_an_asset_of_its_own():
    """Where two templated sinks share a root (docs/assets.md), a job names its own Asset."""
    from airflow.sdk import Asset

    from airflow_batch_provider.task_group import sink_asset

    spec = BatchSpec(source="s3://lake/in/*.jsonl", sink="s3://lake/{{ params.model }}/emb/{{ ds }}", predictor="m:C")
    own = Asset(name="embeddings", uri="s3://lake/emb-by-model")
    with DAG("own_asset", schedule=None):
        group = batch_inference(spec, asset=own)
        default = batch_inference(spec, group_id="default")
    assert group.children["batch_inference.finalize"].outlets == [own]
    assert default.children["default.finalize"].outlets == [sink_asset(spec)]
