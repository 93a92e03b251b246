"""``execution_timeout`` reaches Ray, through ``airflow dags test`` and a real local Ray: the
timed-out shard task cancels its Ray call (the replica stops between two batches and commits
nothing), and a rerun computes the shard once."""

from __future__ import annotations

import json
import os

import pyarrow.dataset as ds
import pytest

from airflow_batch_provider import BatchSpec
from tests.helpers import rows, write_jsonl
from tests.integration.dagtest import DagTester

pytestmark = pytest.mark.slow

# the shard tasks' execution_timeout, from the environment of each `airflow dags test`
TIMEOUT = ", shard_kwargs={'execution_timeout': __import__('datetime').timedelta(seconds=int(os.environ['ABP_TEST_TIMEOUT_S']))}"


def test_execution_timeout_cancels_the_ray_call(tmp_path):
    source = write_jsonl(str(tmp_path / "in" / "rows.jsonl"), rows(40))
    trace = str(tmp_path / "trace.log")
    spec = BatchSpec(source=source, source_format="jsonl", sink=str(tmp_path / "out"), predictor="tests.predictors:NodeTracedDoubler",
                     predictor_kwargs={"trace_log": trace, "sleep_s": 1.0}, rows_per_shard=40, batch_size=2, num_cpus=1)
    tester = DagTester(str(tmp_path / "airflow"), group_kwargs=TIMEOUT)
    run = tester.run(spec, extra_env={"ABP_TEST_TIMEOUT_S": "8"})
    assert run.state == "failed", run.output[-4000:]
    assert "Cancelled Ray work" in run.output and "(it was FAILED)" in run.output, run.output[-4000:]
    batches = [json.loads(line) for line in open(trace)]
    assert 0 < len(batches) < 20  # stopped mid-shard (20 batches of 1 s), not run to the end
    assert not os.path.exists(os.path.join(spec.sink_root, "_checkpoint", "shards"))  # nothing committed

    rerun = tester.run(spec, extra_env={"ABP_TEST_TIMEOUT_S": "3600"})
    assert rerun.state == "success", rerun.output[-4000:]
    ids = sorted(ds.dataset(spec.sink_root, format="parquet").to_table().column("id").to_pylist())
    assert ids == list(range(40))
