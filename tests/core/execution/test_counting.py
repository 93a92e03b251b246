"""Counting end to end in-process: a predictor's counters and the runner's seconds reach the
shard's sentinel, its result, ``_SUCCESS`` (summed) and the sink's status (``docs/counting.md``)."""

from __future__ import annotations

import json
import os

import pytest

from airflow_batch_provider.core import api
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.errors import PredictorOutputError
from tests.helpers import make_spec

TOKENS_IN = sum(range(380)) + 380  # CountingDoubler: ids summed plus one per row
BATCHES = 2 + 2 + 1 + 2 + 1  # shards of 100, 100, 50 | 100, 30 rows in batches of 64


def run_all(spec: api.JobSpec) -> tuple[JobStorage, list[api.ShardResult]]:
    storage = JobStorage.for_spec(spec)
    runner = api.ShardRunner(spec)
    return storage, [runner.run(shard, api.new_attempt()) for shard in plan_job(spec, storage).pending]


def sentinels(storage: JobStorage) -> list[dict]:
    directory = os.path.dirname(storage.sentinel_path("x"))
    return [json.load(open(os.path.join(directory, name))) for name in sorted(os.listdir(directory))]


def test_counters_reach_sentinels_results_success_and_status(tmp_path, jsonl_source):
    spec = make_spec(jsonl_source, str(tmp_path / "out"), predictor="tests.predictors:CountingDoubler", num_gpus=2,
                     gpu_hour_price=3.6)
    storage, results = run_all(spec)
    records = sentinels(storage)
    assert len(records) == 5
    for result, record in zip(sorted(results, key=lambda r: r.shard_id), records, strict=True):
        counters = record["counters"]
        assert counters == result.counters and record["gpu_hour_price"] == 3.6
        assert counters["tokens_out"] == 3 * record["rows_in"]
        assert 0 < counters["model_seconds"] <= counters["replica_seconds"]
        assert counters["gpu_seconds"] == pytest.approx(2 * counters["replica_seconds"])  # replica seconds x num_gpus
        assert result.gpu_seconds == counters["gpu_seconds"]
    summary = api.summarise(results)
    assert (summary["counters"]["tokens_in"], summary["counters"]["tokens_out"], summary["counters"]["batches"]) == (
        TOKENS_IN, 1140, BATCHES)

    manifest = finalize_job(spec, storage)
    on_disk = json.load(open(os.path.join(spec.sink_root, "_SUCCESS")))
    assert on_disk["counters"] == manifest["counters"]
    gpu_seconds = sum(r["counters"]["gpu_seconds"] for r in records)
    assert manifest["counters"]["gpu_seconds"] == pytest.approx(gpu_seconds)
    assert (manifest["counters"]["tokens_in"], manifest["counters"]["tokens_out"]) == (TOKENS_IN, 1140)
    assert manifest["gpu_hour_price"] == 3.6 and manifest["cost"] == pytest.approx(gpu_seconds / 3600 * 3.6)
    assert {p["shard_id"]: p["counters"] for p in manifest["parts"]} == {r["shard_id"]: r["counters"] for r in records}

    status = api.sink_status(spec.sink_root)  # read from _SUCCESS's copy of the sentinels
    assert status.counters == manifest["counters"]
    assert status.gpu_hour_price == 3.6 and status.cost == pytest.approx(manifest["cost"])
    assert api.sink_status(spec.sink_root, gpu_hour_price=1.0).cost == pytest.approx(gpu_seconds / 3600)
    os.remove(os.path.join(spec.sink_root, "_SUCCESS"))
    status = api.sink_status(spec.sink_root)  # from the sentinels: the price the newest commit recorded
    assert status.counters == manifest["counters"] and status.cost == pytest.approx(manifest["cost"])
    assert status.to_dict()["cost"] == status.cost


def test_a_sink_committed_before_counters_reads_as_zeros(tmp_path, jsonl_source):
    """Sentinels written by an older provider have no ``counters``: they add nothing, and a
    skipped shard's result has none; the other shards' still add up."""
    spec = make_spec(jsonl_source, str(tmp_path / "out"), predictor="tests.predictors:CountingDoubler")
    storage, _ = run_all(spec)
    records = sentinels(storage)
    old = records[0]
    del old["counters"]
    with open(storage.sentinel_path(old["shard_id"]), "w") as handle:
        json.dump(old, handle)
    kept = api.summarise([api.ShardResult.skipped(old["shard_id"], old)])
    assert kept["counters"] == {} and kept["rows_in"] == old["rows_in"]

    manifest = finalize_job(spec, storage)
    assert manifest["counters"]["tokens_out"] == 3 * (380 - old["rows_in"])
    assert "cost" not in manifest and "gpu_hour_price" not in manifest  # no price set
    status = api.sink_status(spec.sink_root)
    assert status.counters["tokens_out"] == 3 * (380 - old["rows_in"]) and status.cost is None


def test_a_reserved_counter_name_fails_the_shard_even_when_bad_rows_are_skipped(tmp_path, jsonl_source):
    spec = make_spec(jsonl_source, str(tmp_path / "out"), predictor="tests.predictors:CountingDoubler",
                     predictor_kwargs={"counter": "gpu_seconds"}, bad_rows="skip")
    storage = JobStorage.for_spec(spec)
    shard = plan_job(spec, storage).pending[0]
    with pytest.raises(PredictorOutputError, match=r"'gpu_seconds' is one of the runner's own figures.*shard "):
        api.ShardRunner(spec).run(shard, api.new_attempt())
    assert not os.path.exists(storage.sentinel_path(shard.shard_id))  # nothing committed, no row rejected


def test_the_price_is_not_fingerprinted_and_must_be_a_number(tmp_path, jsonl_source):
    spec = make_spec(jsonl_source, str(tmp_path / "out"))
    assert make_spec(jsonl_source, str(tmp_path / "out"), gpu_hour_price=2.0).fingerprint == spec.fingerprint
    for bad in (-1, "2", float("nan"), True):
        with pytest.raises(api.BatchSpecError, match="gpu_hour_price must be a number >= 0"):
            make_spec(jsonl_source, str(tmp_path / "out"), gpu_hour_price=bad)
