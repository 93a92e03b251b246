"""The sink's Asset URI and the partition key of its events (``airflow_batch_provider.assets``):
what a downstream DAG author writes in ``PartitionedAssetTimetable`` and reads as
``dag_run.partition_key``."""

from __future__ import annotations

import pytest

from airflow_batch_provider import BatchSpec
from airflow_batch_provider.assets import asset_root, asset_uri, is_templated, partition_key
from airflow_batch_provider.task_group import sink_asset


@pytest.mark.parametrize(
    ("sink", "uri"),
    [
        ("s3://lake/emb/{{ ds }}", "s3://lake/emb"),
        ("s3://lake/emb/dt={{ ds }}/", "s3://lake/emb"),
        ("s3://lake/emb/{{ ds }}/v2", "s3://lake/emb"),
        ("s3://lake/{{ params.model }}/emb/{{ ds }}", "s3://lake"),
        ("s3://lake/{{ ds }}", "s3://lake"),
        ("s3://aws_lake@lake/emb/{{ ds }}", "s3://lake/emb"),  # the connection id never reaches the URI
        ("/data/emb/{{ ds_nodash }}", "file:///data/emb"),
        ("/data/emb/{% if params.full %}full{% else %}delta{% endif %}", "file:///data/emb"),
        # untemplated: as before
        ("s3://lake/emb", "s3://lake/emb"),
        ("/data/emb/", "file:///data/emb"),
        # no stable path above the template: the sink as written, as before
        ("s3://{{ var.value.bucket }}/emb", "s3://{{ var.value.bucket }}/emb"),
        ("{{ var.value.root }}/emb", "file://{{ var.value.root }}/emb"),
        ("/{{ ds }}", "file:///{{ ds }}"),
    ],
)
def test_the_asset_uri_is_the_templated_sinks_root(sink, uri):
    assert asset_uri(sink) == uri


def test_sink_asset_keeps_its_name_and_gets_a_stable_uri():
    spec = BatchSpec(source="s3://lake/in/*.jsonl", sink="s3://lake/emb/{{ ds }}", predictor="m:C")
    asset = sink_asset(spec)
    assert asset.uri == "s3://lake/emb"
    assert asset.name == "batch_inference:s3://lake/emb/{{ ds }}"
    plain = sink_asset(BatchSpec(source="/in/*.jsonl", sink="/out/emb", predictor="m:C"))
    assert (plain.uri, plain.name) == ("file:///out/emb", "batch_inference:/out/emb")


@pytest.mark.parametrize(
    ("template", "rendered", "key"),
    [
        ("s3://lake/emb/{{ ds }}", "s3://lake/emb/2026-12-05", "2026-12-05"),
        ("s3://lake/emb/{{ ds }}/", "s3://lake/emb/2026-12-05/", "2026-12-05"),
        # the rendered values only, not the text around them
        ("s3://lake/emb/dt={{ ds }}/part", "s3://lake/emb/dt=2026-12-05/part", "2026-12-05"),
        # several templated parts: Airflow's composite key, which ProductMapper splits on "|"
        ("s3://lake/{{ params.model }}/emb/{{ ds }}", "s3://lake/bert/emb/2026-12-05", "bert|2026-12-05"),
        # constructs side by side render to one value
        ("s3://lake/emb/{{ ds }}{{ params.suffix }}", "s3://lake/emb/2026-12-05b", "2026-12-05b"),
        # a part that renders to nothing is left out
        ("s3://lake/emb/{{ ds }}{# the day #}", "s3://lake/emb/2026-12-05", "2026-12-05"),
        ("s3://aws_lake@lake/emb/{{ ds }}", "s3://lake/emb/2026-12-05", "2026-12-05"),
        # a value that holds the text between two parts: no unambiguous split, the path below the URI
        ("s3://lake/{{ params.a }}-{{ params.b }}", "s3://lake/x-y-z", "x-y-z"),
        # Jinja blocks: the path below the URI
        ("/data/{% if params.full %}full{% else %}delta{% endif %}/{{ ds }}", "/data/delta/2026-12-05", "delta/2026-12-05"),
        # no root above the template: the value
        ("{{ var.value.root }}/emb", "s3://bucket/emb", "s3://bucket"),
    ],
)
def test_the_partition_key_is_what_the_template_rendered_to(template, rendered, key):
    assert partition_key(template, rendered) == key


def test_no_partition_key_for_an_untemplated_sink_or_an_empty_rendering():
    assert partition_key("s3://lake/emb", "s3://lake/emb") is None
    assert not is_templated("s3://lake/emb") and asset_root("s3://lake/emb") is None
    assert partition_key("s3://lake/emb/{{ params.suffix }}", "s3://lake/emb/") is None

