"""``airflow-batch status | verify | gc`` on real sinks, local and on the S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from airflow_batch_provider.cli import main, parse_duration
from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import plan_job
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.execution.runner import ShardRunner
from airflow_batch_provider.core.spec import BatchSpec
from tests.conftest import ROOT


def run_some(spec: BatchSpec, how_many: int, options=None) -> JobStorage:
    storage = JobStorage.for_spec(spec, options)
    runner = ShardRunner(spec, options)
    for shard in plan_job(spec, storage).pending[:how_many]:
        runner.run(shard, new_attempt())
    return storage


@pytest.fixture
def sink(tmp_path, jsonl_source):
    spec = BatchSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"), predictor="tests.predictors:Doubler",
                     rows_per_shard=100)  # 3 + 2 shards
    return spec, run_some(spec, 4)


def test_status_counts_shards_rows_and_shows_the_last_commits(sink, capsys):
    spec, _ = sink
    assert main(["status", spec.sink]) == 0
    text = capsys.readouterr().out
    assert "5 planned: 4 committed, 1 pending, 0 quarantined" in text
    assert "rows        350 in, 350 out, 0 rejected (planned 380)" in text
    assert text.count("part-") == 4 and "finalized   no" in text
    assert main(["status", spec.sink, "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert (figures["committed"], figures["pending"], figures["rows_in"]) == (4, 1, 350)
    assert sum(rows for _, rows in figures["throughput"]) == 350 and figures["bytes"] > 0


def test_the_console_script_runs(sink):
    spec, _ = sink
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "airflow-batch"), "status", spec.sink, "--json"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout)["committed"] == 4


def test_verify_names_each_part_that_differs_from_its_sentinel(sink, capsys):
    spec, storage = sink
    assert main(["verify", spec.sink]) == 0
    assert "4 committed parts checked, 0 mismatched" in capsys.readouterr().out
    parts = sorted(n for n in os.listdir(spec.sink) if n.startswith("part-"))
    flipped = os.path.join(spec.sink, parts[0])
    data = bytearray(open(flipped, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    open(flipped, "wb").write(bytes(data))
    os.remove(os.path.join(spec.sink, parts[1]))
    assert main(["verify", spec.sink]) == 1
    text = capsys.readouterr().out
    assert f"MISMATCH {flipped}: sha256" in text
    assert f"MISMATCH {os.path.join(spec.sink, parts[1])}: missing" in text
    assert "4 committed parts checked, 2 mismatched" in text


def test_gc_removes_only_old_unreferenced_leftovers_and_only_with_yes(sink, capsys):
    spec, storage = sink
    pending = plan_job(spec, storage).pending[0]
    leftover = storage.sink.open_staged(storage.part_path(pending.shard_id))  # a crashed attempt's part
    leftover.stream.write(b"half a part")
    leftover.finish()
    fresh = storage.sink.open_staged(storage.part_path(pending.shard_id))  # an attempt still writing
    fresh.stream.write(b"in progress")
    fresh.finish()
    hour_ago = time.time() - 3600
    os.utime(leftover.staged, (hour_ago, hour_ago))
    assert main(["gc", spec.sink, "--older-than", "30m"]) == 0
    text = capsys.readouterr().out
    assert text.count("would remove staged part") == 1 and "(dry run" in text
    assert os.path.exists(leftover.staged)
    assert main(["gc", spec.sink, "--older-than", "30m", "--yes"]) == 0
    assert "removed staged part" in capsys.readouterr().out
    assert not os.path.exists(leftover.staged) and os.path.exists(fresh.staged)
    assert main(["verify", spec.sink]) == 0  # committed parts untouched


def test_durations():
    assert (parse_duration("90s"), parse_duration("30m"), parse_duration("6h"), parse_duration("2d")) == (90, 1800, 21600, 172800)
    with pytest.raises(Exception, match="90 minutes"):
        parse_duration("90 minutes")


def test_status_and_verify_on_s3_with_the_tasks_connection(s3_server, s3_bucket, tmp_path, jsonl_source, monkeypatch, capsys):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    for name in os.listdir(jsonl_source):
        fs.put(os.path.join(jsonl_source, name), f"{s3_bucket}/in/{name}")
    spec = BatchSpec(source=f"s3://{s3_bucket}/in/", source_format="jsonl", sink=f"s3://{s3_bucket}/out",
                     predictor="tests.predictors:Doubler", rows_per_shard=100)
    run_some(spec, 5, s3_server.storage_options())
    monkeypatch.setenv("AIRFLOW_CONN_ABP_CLI_S3", s3_server.connection_json())
    assert main(["status", spec.sink, "--conn-id", "abp_cli_s3", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert (figures["committed"], figures["pending"], figures["rows_out"]) == (5, 0, 380)
    assert main(["verify", spec.sink, "--conn-id", "abp_cli_s3"]) == 0
    assert "5 committed parts checked, 0 mismatched" in capsys.readouterr().out
    assert s3_server.secret_key not in json.dumps(figures)


def test_status_reads_each_sentinel_once_and_a_finalized_sink_from_its_manifest(s3_server, s3_bucket, jsonl_source):
    """The status page refreshes every 15 s: sentinels never change, so only new ones are fetched;
    a finalized sink is read from ``_SUCCESS`` (one GET) instead of one GET per sentinel."""
    import s3fs

    from airflow_batch_provider.core import api
    from airflow_batch_provider.core.domain.jobs import finalize_job
    from tests.s3_server import RequestCounter, store_clients

    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    for name in os.listdir(jsonl_source):
        fs.put(os.path.join(jsonl_source, name), f"{s3_bucket}/in/{name}")
    spec = BatchSpec(source=f"s3://{s3_bucket}/in/", source_format="jsonl", sink=f"s3://{s3_bucket}/out",
                     predictor="tests.predictors:Doubler", rows_per_shard=50)  # 8 shards
    options = s3_server.storage_options()
    storage = run_some(spec, 5, options)

    def gets_during_status():
        from airflow_batch_provider.core.domain.inspection import SinkFiles

        probe = SinkFiles(spec.sink, None, options)
        with RequestCounter(*store_clients(probe.sink_store, probe.checkpoint_store)) as count:
            status = api.sink_status(spec.sink, None, options)
        return status, count.by_operation.get("GetObject", 0)

    first, first_gets = gets_during_status()
    again, again_gets = gets_during_status()
    assert first.committed == again.committed == 5 and first.rows_in == again.rows_in == 250
    assert first_gets >= 5 and again_gets <= 2  # plan + _SUCCESS probe; no sentinel again
    run_some(spec, 3, options)
    finalize_job(spec, storage)
    done, done_gets = gets_during_status()
    assert (done.committed, done.pending, done.rows_in) == (8, 0, 380) and done.finalized_at
    assert done_gets <= 2
