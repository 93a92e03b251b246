"""The runner's hook for predictors that fail some rows of a batch themselves (``RowsFailed``)
and for those that can serve no row (``PredictorUnavailableError``): exactly the named rows go
to the bad-row policy, the other rows' output is kept, and nothing is sent to the predictor twice."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.errors import PredictorFailedError, PredictorOutputError, PredictorUnavailableError, RowsFailed
from airflow_batch_provider.core.execution.runner import ShardRunner
from tests.helpers import make_spec, sink_table

CALLS: list[list[int]] = []


class FailsMultiplesOf7:
    """Doubles ``value``; fails the rows whose id is a multiple of 7 by raising RowsFailed."""

    def __init__(self, batch_format: str = "numpy"):
        self.batch_format = batch_format

    def __call__(self, batch):
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_pandas(batch) if hasattr(batch, "iloc") else pa.table(batch)
        ids = table.column("id").to_pylist()
        CALLS.append(ids)
        failed = {i: f"id {v} is a multiple of 7" for i, v in enumerate(ids) if v % 7 == 0}
        kept = [i for i in range(len(ids)) if i not in failed]
        out = pa.table({"id": [ids[i] for i in kept], "value": [table.column("value")[i].as_py() * 2 for i in kept]})
        if failed:
            raise RowsFailed(failed, output=out)
        return out


class NamesARowOutside:
    def __call__(self, batch):
        raise RowsFailed({10_000: "no such row"})


class Unavailable:
    def __call__(self, batch):
        CALLS.append(list(batch["id"]))
        raise PredictorUnavailableError("the endpoint refused the key")


def _rejected(sink_root: str) -> list[dict]:
    folder = os.path.join(sink_root, "_rejected")
    return [json.loads(line) for name in sorted(os.listdir(folder)) if name.endswith(".jsonl") for line in open(os.path.join(folder, name))]


@pytest.mark.parametrize("fmt", ["numpy", "pandas", "pyarrow"])
def test_skip_rejects_exactly_the_named_rows_and_keeps_the_others(tmp_path, jsonl_source, fmt):
    CALLS.clear()
    spec = make_spec(jsonl_source, str(tmp_path / "out"), predictor=f"{__name__}:FailsMultiplesOf7", bad_rows="skip",
                     batch_format=fmt, batch_size=32)
    runner = ShardRunner(spec)
    for shard in plan_job(spec).pending:
        runner.run(shard, new_attempt())
    manifest = finalize_job(spec)
    bad = [i for i in range(380) if i % 7 == 0]
    assert manifest["rows_rejected"] == len(bad) and manifest["rows_out"] == 380 - len(bad)
    table = sink_table(spec.sink_root)
    assert table.column("id").to_pylist() == [i for i in range(380) if i % 7]
    assert table.column("value").to_pylist() == [i * 0.5 * 2 for i in range(380) if i % 7]
    sent = [i for call in CALLS for i in call]
    assert sorted(sent) == list(range(380))  # each row sent once: no batch split and sent again
    records = _rejected(spec.sink_root)
    assert sorted(r["row"]["id"] for r in records) == bad
    first = next(r for r in records if r["file"].endswith("a.jsonl") and r["row"]["id"] == 7)
    assert first["line"] == 8 and first["stage"] == "predict"  # 1-based line of id 7
    assert "a.jsonl line 8: id 7 is a multiple of 7" in first["error"]


def test_fail_names_the_first_failed_row(tmp_path, jsonl_source):
    CALLS.clear()
    spec = make_spec(jsonl_source, str(tmp_path / "out"), predictor=f"{__name__}:FailsMultiplesOf7", batch_size=32)
    shard = plan_job(spec).pending[0]
    with pytest.raises(PredictorFailedError, match=r"a\.jsonl line 1: id 0 is a multiple of 7 \(5 row\(s\) of this batch failed\)"):
        ShardRunner(spec).run(shard, new_attempt())
    assert len(CALLS) == 1  # failed at once, the batch not split
    assert not os.path.exists(os.path.join(spec.sink_root, "_rejected"))


def test_a_row_index_outside_the_batch_is_refused(tmp_path, jsonl_source):
    spec = make_spec(jsonl_source, str(tmp_path / "out"), predictor=f"{__name__}:NamesARowOutside", bad_rows="skip")
    with pytest.raises(PredictorOutputError, match="row\\(s\\) \\[10000\\] of a batch of"):
        ShardRunner(spec).run(plan_job(spec).pending[0], new_attempt())


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_unavailable_fails_the_shard_without_rejecting_rows(tmp_path, jsonl_source, policy):
    CALLS.clear()
    spec = make_spec(jsonl_source, str(tmp_path / "out"), predictor=f"{__name__}:Unavailable", bad_rows=policy, batch_size=32)
    with pytest.raises(PredictorUnavailableError, match="refused the key \\(shard .*a\\.jsonl lines 1-32\\)"):
        ShardRunner(spec).run(plan_job(spec).pending[0], new_attempt())
    assert len(CALLS) == 1  # not split into halves
    assert not os.path.exists(os.path.join(spec.sink_root, "_rejected"))


def test_rows_failed_needs_a_row():
    with pytest.raises(ValueError):
        RowsFailed({})
