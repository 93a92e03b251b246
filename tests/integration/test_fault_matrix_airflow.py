"""The fault matrix through Airflow: a Ray model replica SIGKILLed at each point where it
writes, with sync and with deferrable shard tasks (`airflow dags test`, a real local Ray).

This is where the two paths differ: a sync task waits on the Ray call itself, a deferred one
has its trigger poll it. In both, Ray restarts the replica and the task submits the lost call
again within the same try (up to ``max_retries``): the sync task itself, the deferred one on
its trigger's ``lost`` event. The run must end with every row once. A crash point
that fires outside the replica (``finalize_before_manifest``) and every point on S3 are in
tests/core/domain/test_fault_matrix.py. Set ``ABP_MATRIX_OUT`` to collect the figures.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import logged_ids, make_spec, sink_table
from tests.integration.dagtest import DagTester

pytestmark = pytest.mark.slow

REPLICA_POINTS = ("mid_part", "before_sentinel", "before_publish", "after_publish")


@pytest.fixture(scope="module", params=["sync", "deferrable"])
def tester(request, tmp_path_factory, dag_tester):
    if request.param == "sync":
        return "sync", dag_tester
    home = str(tmp_path_factory.mktemp("airflow_home_deferrable"))
    return "deferrable", DagTester(home, dag_id="abp_deferrable", group_kwargs=", deferrable=True")


@pytest.mark.parametrize("point", REPLICA_POINTS)
def test_replica_killed_at_each_point_ray_retries_within_the_try(tester, point, jsonl_source, tmp_path):
    mode, dags = tester
    calls, marker = tmp_path / "calls.log", tmp_path / "killed"
    spec = make_spec(jsonl_source, str(tmp_path / "out"), predictor_kwargs={"calls_log": str(calls)}, max_retries=2)
    run = dags.run(spec, extra_env={"ABP_FAILPOINTS": f"{point}=kill@{marker}"})
    assert marker.exists(), "the failpoint never fired"
    assert run.state == "success", run.output[-4000:]
    ids = sink_table(spec.sink_root).column("id").to_pylist()
    figures = {
        "airflow": mode, "point": point, "rows": 380,
        "rows_lost": 380 - len(set(ids)),
        "rows_duplicated": len(ids) - len(set(ids)),
        "rows_recomputed": len(logged_ids(calls)) - 380,
    }
    print(json.dumps(figures))
    if os.environ.get("ABP_MATRIX_OUT"):
        with open(os.environ["ABP_MATRIX_OUT"], "a") as out:
            out.write(json.dumps(figures) + "\n")
    assert (figures["rows_lost"], figures["rows_duplicated"]) == (0, 0)
    assert figures["rows_recomputed"] <= 100  # at most the one shard whose replica died
