"""End to end through `airflow dags test` with a real local Ray (one Ray per DAG run)."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import logged_ids, make_spec, rows, sink_table

pytestmark = pytest.mark.slow


def test_full_run_equals_direct_computation(dag_tester, jsonl_source, tmp_path):
    spec = make_spec(jsonl_source, str(tmp_path / "out"))
    run = dag_tester.run(spec)
    assert run.state == "success", run.output[-3000:]
    assert run.plan_counts() == (5, 0, 5)
    table = sink_table(spec.sink_root)
    expected = {r["id"]: r["value"] * 2 for r in rows(380)}
    assert dict(zip(table.column("id").to_pylist(), table.column("value").to_pylist(), strict=True)) == expected
    assert table.num_rows == 380
    manifest = json.load(open(os.path.join(spec.sink_root, "_SUCCESS")))
    assert manifest["rows_out"] == 380 and manifest["shards"] == 5
    # the run's structured events add up to the manifest
    assert sum(e["rows_in"] for e in run.events("shard_done") if e["status"] == "computed") == 380
    assert [(e["shards"], e["rows_out"], e["computed_this_run"]) for e in run.events("result")] == [(5, 380, 5)]
    # mapped tasks are labelled with their shard id and input range
    assert "a.jsonl lines 0-100" in run.output

    again = dag_tester.run(spec)
    assert again.state == "success"
    assert again.plan_counts() == (5, 5, 0)
    assert sink_table(spec.sink_root).num_rows == 380


def test_failed_shards_then_rerun_computes_only_those(dag_tester, jsonl_source, tmp_path):
    calls, marker = tmp_path / "calls.log", tmp_path / "fail-now"
    marker.touch()
    spec = make_spec(
        jsonl_source, str(tmp_path / "out"),
        predictor_kwargs={"calls_log": str(calls), "fail_marker": str(marker), "fail_mod": 97},
    )
    first = dag_tester.run(spec)
    assert first.state == "failed"
    assert "injected failure" in first.output
    # ids 0, 97 (shard 0-100), 194 (100-200), 291 (b.jsonl 0-100) fail; 2 of 5 shards commit
    committed = [n for n in os.listdir(spec.sink_root) if n.startswith("part-")]
    assert len(committed) == 2
    first_calls = set(logged_ids(calls))
    os.remove(marker)
    calls.write_text("")

    second = dag_tester.run(spec)
    assert second.state == "success", second.output[-3000:]
    assert second.plan_counts() == (5, 2, 3)
    recomputed = sorted(logged_ids(calls))
    assert recomputed == list(range(0, 200)) + list(range(250, 350))  # only the failed shards
    assert first_calls  # the first run did compute
    table = sink_table(spec.sink_root)
    assert table.column("id").to_pylist() == list(range(380))


def test_spec_change_fails_closed_with_a_clear_message(dag_tester, jsonl_source, tmp_path):
    spec = make_spec(jsonl_source, str(tmp_path / "out"))
    assert dag_tester.run(spec).state == "success"
    changed = make_spec(jsonl_source, str(tmp_path / "out"), predictor_kwargs={"factor": 3})
    run = dag_tester.run(changed)
    assert run.state == "failed"
    assert "holds committed shards of a different spec (predictor_kwargs: {} -> {'factor': 3})" in run.output
    assert "resume=False" in run.output
    table = sink_table(spec.sink_root)
    assert table.column("value").to_pylist() == [r["value"] * 2 for r in rows(380)]  # untouched

    fresh = make_spec(jsonl_source, str(tmp_path / "out"), predictor_kwargs={"factor": 3}, resume=False)
    assert dag_tester.run(fresh).state == "success"
    assert sink_table(spec.sink_root).column("value").to_pylist() == [r["value"] * 3 for r in rows(380)]


def test_resume_false_starts_fresh_in_each_new_dag_run(dag_tester, jsonl_source, tmp_path):
    """Each `dags test` is a new DAG run: resume=False removes the earlier run's output first
    (the same run cleared keeps its own: tests/deployment scenario 5, tests/operators)."""
    calls, marker = tmp_path / "calls.log", tmp_path / "fail-now"
    assert dag_tester.run(make_spec(jsonl_source, str(tmp_path / "out"))).state == "success"
    marker.touch()
    spec = make_spec(
        jsonl_source, str(tmp_path / "out"), resume=False,
        predictor_kwargs={"calls_log": str(calls), "fail_marker": str(marker), "fail_mod": 97},
    )
    first = dag_tester.run(spec)
    assert first.state == "failed" and "resume=False: deleted 5 part files" in first.output
    assert first.plan_counts() == (5, 0, 5)
    assert not os.path.exists(os.path.join(spec.sink_root, "_SUCCESS"))
    os.remove(marker)
    calls.write_text("")

    second = dag_tester.run(spec)
    assert second.state == "success", second.output[-3000:]
    assert "resume=False: deleted 2 part files" in second.output  # the 2 the failed run committed
    assert second.plan_counts() == (5, 0, 5) and sorted(logged_ids(calls)) == list(range(380))
    assert sink_table(spec.sink_root).column("id").to_pylist() == list(range(380))


def test_filtering_predictor(dag_tester, jsonl_source, tmp_path):
    spec = make_spec(jsonl_source, str(tmp_path / "out"), predictor="tests.predictors:EvenFilter")
    run = dag_tester.run(spec)
    assert run.state == "success", run.output[-3000:]
    manifest = json.load(open(os.path.join(spec.sink_root, "_SUCCESS")))
    assert (manifest["rows_in"], manifest["rows_out"]) == (380, 190)
    assert sink_table(spec.sink_root).column("id").to_pylist() == list(range(0, 380, 2))


def test_sigkill_of_ray_worker_before_sentinel_then_rerun(dag_tester, jsonl_source, tmp_path):
    calls, marker = tmp_path / "calls.log", tmp_path / "killed"
    spec = make_spec(jsonl_source, str(tmp_path / "out"), predictor_kwargs={"calls_log": str(calls)}, max_retries=0)
    run = dag_tester.run(spec, extra_env={"ABP_FAILPOINTS": f"before_sentinel=kill@{marker}"})
    assert marker.exists()  # a Ray worker died after writing its part, before the sentinel
    assert run.state == "failed"
    parts = [n for n in os.listdir(spec.sink_root) if n.startswith("part-")]
    assert len(parts) == 4  # the killed shard's data is staged (hidden), never published
    calls.write_text("")

    rerun = dag_tester.run(spec)
    assert rerun.state == "success", rerun.output[-3000:]
    assert rerun.plan_counts() == (5, 4, 1)
    shard_ranges = [range(0, 100), range(100, 200), range(200, 250), range(250, 350), range(350, 380)]
    assert sorted(logged_ids(calls)) in [list(r) for r in shard_ranges]  # only the killed shard
    assert sink_table(spec.sink_root).column("id").to_pylist() == list(range(380))
    # the killed attempt's staged file stays hidden until idle past finalize's grace period
    # (it could be another run's live attempt); `airflow-batch gc` removes it sooner
    assert len(os.listdir(os.path.join(spec.sink_root, "_staging"))) <= 1


def test_ray_retries_a_killed_worker_within_the_run(dag_tester, jsonl_source, tmp_path):
    marker = tmp_path / "killed"
    spec = make_spec(jsonl_source, str(tmp_path / "out"), max_retries=2)
    run = dag_tester.run(spec, extra_env={"ABP_FAILPOINTS": f"before_sentinel=kill@{marker}"})
    assert marker.exists()
    assert run.state == "success", run.output[-3000:]
    assert sink_table(spec.sink_root).column("id").to_pylist() == list(range(380))


def test_messy_jsonl_with_file_urls_gives_one_schema(dag_tester, tmp_path):
    """Issue 11 through Airflow: a field null in every row of one shard, a key absent from
    another, int in one shard and float in another, and file:// URLs for source and sink."""
    from tests.corpus.readback import read_back

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"id": i, "value": i, "note": None}) + "\n" for i in range(100)))
    (src / "b.jsonl").write_text("".join(json.dumps({"id": i, "value": i + 0.5}) + "\n" for i in range(100, 150)))
    spec = make_spec(f"file://{src}", f"file://{tmp_path}/out", predictor="tests.predictors:Identity")
    (src / "c.jsonl").write_text("".join(json.dumps({"id": i, "value": 1, "note": f"n{i}"}) + "\n" for i in range(150, 160)))
    run = dag_tester.run(spec)
    assert run.state == "success", run.output[-3000:]
    table = read_back(str(tmp_path / "out"), "parquet").sort_by("id")
    assert table.schema.names == ["id", "value", "note"]
    assert table.num_rows == 160
    assert table.column("value").to_pylist()[99:101] == [99.0, 100.5]
    assert table.column("note").to_pylist()[98:] == [None] * 52 + [f"n{i}" for i in range(150, 160)]
    assert json.load(open(tmp_path / "out" / "_SUCCESS"))["schema"]["columns"] == {"id": "int64", "value": "float64", "note": "string"}


def test_redrive_after_a_fix_computes_only_the_rejected_rows(dag_tester, jsonl_source, tmp_path):
    """A predictor that raises on some rows under bad_rows="skip": the run succeeds with them in
    _rejected/. The user fixes the predictor and triggers the same DAG with
    conf {"redrive_rejected": true} (the spec templates it): only those rows are computed, each
    lands once in the sink, the rejected files are retired and _SUCCESS counts them."""
    calls, marker = tmp_path / "calls.log", tmp_path / "predictor-broken"
    marker.touch()
    spec = make_spec(
        jsonl_source, str(tmp_path / "out"), bad_rows="skip", redrive_rejected="{{ dag_run.conf.get('redrive_rejected', False) }}",
        predictor_kwargs={"calls_log": str(calls), "fail_marker": str(marker), "fail_mod": 97},
    )
    first = dag_tester.run(spec)
    assert first.state == "success", first.output[-3000:]
    manifest = json.load(open(os.path.join(spec.sink_root, "_SUCCESS")))
    assert (manifest["rows_out"], manifest["rows_rejected"]) == (376, 4)
    rejected = os.path.join(spec.sink_root, "_rejected")
    assert len([n for n in os.listdir(rejected) if n.endswith(".jsonl")]) == 3
    os.remove(marker)  # the fix
    calls.write_text("")

    second = dag_tester.run(spec, conf={"redrive_rejected": True})
    assert second.state == "success", second.output[-3000:]
    assert second.plan_counts() == (5, 5, 3)  # no shard again: three re-drive units
    assert sorted(logged_ids(calls)) == [0, 97, 194, 291]  # only the rejected rows were computed
    assert sink_table(spec.sink_root).column("id").to_pylist() == list(range(380))
    assert [n for n in os.listdir(rejected) if n.endswith(".jsonl")] == []
    assert len(os.listdir(os.path.join(rejected, "_retired"))) == 3
    manifest = json.load(open(os.path.join(spec.sink_root, "_SUCCESS")))
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"], manifest["rows_redriven"]) == (380, 380, 0, 4)
