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
from airflow_batch_provider.core.spec import JobSpec
from tests.helpers import ROOT, spec_on


def run_some(spec: JobSpec, how_many: int, options=None) -> JobStorage:
    storage = JobStorage.for_spec(spec, options)
    runner = ShardRunner(spec, options)
    for shard in plan_job(spec, storage).pending[:how_many]:
        runner.run(shard, new_attempt())
    return storage


@pytest.fixture
def sink(tmp_path, jsonl_source):
    spec = JobSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"), predictor="tests.predictors:Doubler",
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
    assert "4 committed parts checked, 0 problem(s)" in capsys.readouterr().out
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
    assert "4 committed parts checked, 2 problem(s)" in text


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


def s3_spec(s3_server, s3_bucket: str, jsonl_source: str, rows_per_shard: int) -> JobSpec:
    """A spec over ``jsonl_source`` copied to ``s3://{s3_bucket}/in/``, its sink beside it."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    for name in os.listdir(jsonl_source):
        fs.put(os.path.join(jsonl_source, name), f"{s3_bucket}/in/{name}")
    return spec_on(s3_bucket, source_format="jsonl", rows_per_shard=rows_per_shard)


def test_status_and_verify_on_s3_with_the_tasks_connection(s3_server, s3_bucket, tmp_path, jsonl_source, monkeypatch, capsys):
    spec = s3_spec(s3_server, s3_bucket, jsonl_source, 100)
    run_some(spec, 5, s3_server.storage_options())
    monkeypatch.setenv("AIRFLOW_CONN_ABP_CLI_S3", s3_server.connection_json())
    assert main(["status", spec.sink, "--conn-id", "abp_cli_s3", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert (figures["committed"], figures["pending"], figures["rows_out"]) == (5, 0, 380)
    assert main(["verify", spec.sink, "--conn-id", "abp_cli_s3"]) == 0
    assert "5 committed parts checked, 0 problem(s)" in capsys.readouterr().out
    assert s3_server.secret_key not in json.dumps(figures)


def test_without_conn_id_the_cli_reads_aws_default_as_the_tasks_do(s3_server, s3_bucket, jsonl_source):
    """The console script, so that stdout is what a pipeline reads: the figures alone, Airflow's
    and the amazon provider's logs on stderr."""
    spec = s3_spec(s3_server, s3_bucket, jsonl_source, 100)
    run_some(spec, 2, s3_server.storage_options())
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AIRFLOW_CONN_AWS_DEFAULT=s3_server.connection_json(), AWS_EC2_METADATA_DISABLED="true")
    done = subprocess.run([sys.executable, "-m", "airflow_batch_provider", "status", spec.sink, "--json"],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done
    assert json.loads(done.stdout)["committed"] == 2
    assert s3_server.secret_key not in done.stdout + done.stderr


def test_status_reads_each_sentinel_once_and_a_finalized_sink_from_its_manifest(s3_server, s3_bucket, jsonl_source):
    """The status page refreshes every 15 s: sentinels never change, so only new ones are fetched;
    a finalized sink is read from ``_SUCCESS`` (one GET) instead of one GET per sentinel."""
    from airflow_batch_provider.core import api
    from airflow_batch_provider.core.domain.jobs import finalize_job
    from tests.s3_server import RequestCounter, store_clients

    spec = s3_spec(s3_server, s3_bucket, jsonl_source, 50)  # 8 shards
    options = s3_server.storage_options()
    storage = run_some(spec, 5, options)

    def gets_during_status():
        from airflow_batch_provider.core.domain.layout import SinkLayout

        probe = SinkLayout.at(spec.sink, None, options)
        with RequestCounter(*store_clients(probe.sink, probe.checkpoint)) as count:
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


# -- what is not a healthy sink: non-zero exit, so a pipeline can gate on status and verify --------
@pytest.mark.parametrize("command", ["status", "verify"])
def test_a_path_that_is_not_a_sink_exits_2(command, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for path in (str(tmp_path / "nowhere"), str(tmp_path / "empty")):
        assert main([command, path]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path} is not the sink of a batch job") and "--checkpoint-dir" in err


@pytest.mark.parametrize("url, says", [("gs://x", "gs:// is not supported"), ("s3://", "names no bucket"),
                                       ("s3:///out", "names no bucket")])
def test_unsupported_urls_give_one_line_and_exit_2(url, says):
    for command in (["status", url], ["verify", url], ["gc", url, "--older-than", "1h"]):
        done = subprocess.run([sys.executable, "-m", "airflow_batch_provider", *command], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 2, done
        assert done.stderr.count("\n") == 1 and says in done.stderr and "Traceback" not in done.stderr


def test_a_conn_id_that_does_not_exist_is_an_error(monkeypatch, capsys):
    monkeypatch.delenv("AIRFLOW_CONN_ABP_NOWHERE", raising=False)
    assert main(["status", "s3://bucket/out", "--conn-id", "abp_nowhere"]) == 2
    err = capsys.readouterr().err
    assert "connection 'abp_nowhere'" in err and "does not exist" in err


def test_an_unparseable_sentinel_and_a_part_no_sentinel_names_fail_verify_and_status(sink, capsys):
    spec, storage = sink
    sentinels = sorted(os.listdir(storage.sentinel_dir))
    broken = os.path.join(storage.sentinel_dir, sentinels[0])
    open(broken, "w").write('{"shard_id": "cut sh')
    stray = os.path.join(spec.sink, "part-0000stray.parquet")
    open(stray, "wb").write(b"PAR1")
    assert main(["verify", spec.sink]) == 1
    out = capsys.readouterr().out
    assert f"MISMATCH {broken}: the sentinel does not parse" in out
    assert f"MISMATCH {stray}: no sentinel names this part" in out
    # the broken sentinel's own part is now a part no (readable) sentinel names
    assert out.count("no sentinel names this part") == 2 and "3 committed parts checked, 3 problem(s)" in out
    assert main(["status", spec.sink]) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM {broken}: the sentinel does not parse" in out and f"PROBLEM {stray}" in out


def test_status_reports_a_deleted_part(sink, capsys):
    spec, _ = sink
    part = os.path.join(spec.sink, sorted(n for n in os.listdir(spec.sink) if n.startswith("part-"))[0])
    os.remove(part)
    assert main(["status", spec.sink, "--json"]) == 1
    figures = json.loads(capsys.readouterr().out)
    assert figures["healthy"] is False
    assert [p for p in figures["problems"] if p.startswith(f"{part}: missing (shard ")] != []


def test_a_manifest_or_plan_that_disagrees_with_the_sentinels_fails_verify(tmp_path, jsonl_source, capsys):
    from airflow_batch_provider.core.domain.jobs import finalize_job

    spec = JobSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"), predictor="tests.predictors:Doubler",
                     rows_per_shard=100)
    storage = run_some(spec, 5)
    finalize_job(spec, storage)
    assert main(["verify", spec.sink]) == 0 and main(["status", spec.sink]) == 0
    capsys.readouterr()
    manifest_path = os.path.join(spec.sink, "_SUCCESS")
    manifest = json.load(open(manifest_path))
    dropped = manifest["parts"].pop()
    json.dump(manifest, open(manifest_path, "w"))
    assert main(["verify", spec.sink]) == 1
    assert f"shard {dropped['shard_id']} is committed but {manifest_path} does not list it" in capsys.readouterr().out
    open(manifest_path, "w").write("{not json")
    assert main(["verify", spec.sink]) == 1
    assert f"MISMATCH {manifest_path}: does not parse as JSON" in capsys.readouterr().out
    os.remove(manifest_path)
    os.remove(storage.plan_path)
    assert main(["verify", spec.sink]) == 1
    assert f"MISMATCH {storage.plan_path}: missing, but 5 shard(s) are committed" in capsys.readouterr().out


def test_speed_is_measured_from_the_plan_not_the_first_commit(sink, capsys):
    """From the first commit, the first shards' compute time is left out: 171 rows/s where the
    tasks logged 121-131 in a real run."""
    spec, storage = sink
    assert main(["status", spec.sink, "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    planned = figures["last_commit_at"] - 100.0  # the plan was written 100 s before the last commit
    os.utime(storage.plan_path, (planned, planned))
    assert main(["status", spec.sink, "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["rows_per_second"] == pytest.approx(350 / 100.0, rel=1e-3)
    assert main(["status", spec.sink]) == 0
    assert "speed       4 rows/s over 1.7 min from the plan to the last commit" in capsys.readouterr().out


def test_gc_refuses_zero_and_a_sink_whose_checkpoint_it_cannot_see(tmp_path, jsonl_source, capsys):
    spec = JobSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"), predictor="tests.predictors:Doubler",
                     rows_per_shard=100, checkpoint_dir=str(tmp_path / "elsewhere"))
    storage = run_some(spec, 4)
    pending = plan_job(spec, storage).pending[0]
    leftover = storage.sink.open_staged(storage.part_path(pending.shard_id))
    leftover.stream.write(b"half a part")
    leftover.finish()
    hour_ago = time.time() - 3600
    os.utime(leftover.staged, (hour_ago, hour_ago))
    with pytest.raises(SystemExit) as exit_:
        main(["gc", spec.sink, "--checkpoint-dir", spec.checkpoint_dir, "--older-than", "0s"])
    assert exit_.value.code == 2 and "grace period" in capsys.readouterr().err
    # Without --checkpoint-dir gc cannot tell committed staged data from leftovers: it removes nothing.
    assert main(["gc", spec.sink, "--older-than", "30m", "--yes"]) == 2
    assert "gc needs the job's checkpoint" in capsys.readouterr().err and os.path.exists(leftover.staged)
    assert main(["gc", spec.sink, "--checkpoint-dir", spec.checkpoint_dir, "--older-than", "30m", "--yes"]) == 0
    assert "removed staged part" in capsys.readouterr().out and not os.path.exists(leftover.staged)


def test_a_reader_that_goes_away_ends_it_quietly_and_version(sink, tmp_path, capsys):
    spec, _ = sink
    err = tmp_path / "stderr"
    shell = f"{sys.executable} -m airflow_batch_provider status {spec.sink} 2>{err} | true"
    subprocess.run(["bash", "-c", shell], cwd=ROOT, check=True)
    assert "Traceback" not in err.read_text() and "BrokenPipe" not in err.read_text()
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("airflow-batch ")


def test_status_shows_counters_tokens_per_second_and_the_cost(tmp_path, jsonl_source, capsys):
    """tokens/s beside rows/s, over the same span; the cost at the spec's price or at --gpu-hour-price."""
    spec = JobSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"), rows_per_shard=100,
                   predictor="tests.predictors:CountingDoubler", gpu_hour_price=2.0)
    storage = run_some(spec, 5)
    assert main(["status", spec.sink, "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    counters = figures["counters"]
    assert (counters["tokens_out"], counters["tokens_in"]) == (1140, sum(range(380)) + 380)
    assert counters["gpu_seconds"] == 0 < counters["model_seconds"] <= counters["replica_seconds"]  # num_gpus=0
    assert (figures["gpu_hour_price"], figures["cost"]) == (2.0, 0.0)
    planned = figures["last_commit_at"] - 100.0
    os.utime(storage.plan_path, (planned, planned))
    assert main(["status", spec.sink, "--gpu-hour-price", "3600"]) == 0
    text = capsys.readouterr().out
    assert "counters    batches 8, tokens_in 72,390, tokens_out 1,140\n" in text
    assert "speed       4 rows/s, 724 tokens_in/s, 11 tokens_out/s over 1.7 min from the plan to the last commit" in text
    assert "compute     " in text and "GPU-s (0.000 GPU-h)" in text
    assert "cost        0.00 at 3600 per GPU-hour" in text
    with pytest.raises(SystemExit) as exit_status:
        main(["status", spec.sink, "--gpu-hour-price", "-1"])
    assert exit_status.value.code == 2  # argparse's, for a bad argument
    assert "is not a price" in capsys.readouterr().err


def test_status_shows_rejected_rows_waiting_for_a_redrive_and_how_to_run_it(tmp_path, jsonl_source, capsys):
    import dataclasses

    from airflow_batch_provider.core.domain.jobs import finalize_job

    marker = tmp_path / "broken"
    marker.touch()
    spec = JobSpec(source=jsonl_source, source_format="jsonl", sink=str(tmp_path / "out"), predictor="tests.predictors:Doubler",
                   rows_per_shard=100, bad_rows="skip", predictor_kwargs={"fail_marker": str(marker), "fail_mod": 97})
    run_some(spec, 5)
    assert main(["status", spec.sink]) == 0
    text = capsys.readouterr().out
    assert "rejected    4 rows in 3 file(s)" in text and "redrive_rejected=True" in text
    marker.unlink()
    run_some(dataclasses.replace(spec, redrive_rejected=True), 3)
    finalize_job(spec)
    assert main(["status", spec.sink]) == 0
    text = capsys.readouterr().out
    assert "380 out, 0 rejected" in text and "re-driven   4 rows in 3 re-drive(s)" in text
    assert "rejected    " not in text
    assert main(["verify", spec.sink]) == 0
    assert "8 committed parts checked, 0 problem(s)" in capsys.readouterr().out
