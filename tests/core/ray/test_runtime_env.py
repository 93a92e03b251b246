"""Code shipped with ``runtime_env``, on a real multi-node Ray whose nodes do not have the
predictor: its module lives in a temp dir that is on no node's ``PYTHONPATH``.

With ``runtime_env={"working_dir": <that dir>}`` the job runs (Ray uploads the directory and
every replica imports the predictor from it); without it, the shard fails at once with the
replica's import error, which says to install the module on the nodes or ship it with
``runtime_env``, instead of the pool waiting on replicas that die as they start.
"""

from __future__ import annotations

import pytest

from tests.core.ray.conftest import run_driver
from tests.helpers import rows, sink_ids, write_jsonl, write_shipped_predictor

pytestmark = pytest.mark.slow

JOB = """
import time
from airflow_batch_provider.core.api import JobSpec, ReplicaPool, new_attempt, plan

spec = JobSpec(source=ARGS["source"], source_format="jsonl", sink=ARGS["sink"], predictor=ARGS["predictor"], num_cpus=0.5,
               rows_per_shard=20, num_replicas=1, runtime_env=ARGS["runtime_env"])
pool = ReplicaPool(spec)
started = time.monotonic()
try:
    work = pool.submit(plan(spec).pending, new_attempt())
    RESULT["results"] = pool.result(work)
except Exception as err:
    RESULT["error"] = {"type": type(err).__name__, "message": str(err), "retryable": getattr(err, "retryable", None)}
finally:
    RESULT["seconds"] = time.monotonic() - started
    RESULT["stopped"] = pool.shutdown(force=True)
"""


@pytest.fixture
def shipped(tmp_path):
    predictor = write_shipped_predictor(tmp_path / "code")
    source = write_jsonl(str(tmp_path / "in" / "rows.jsonl"), rows(50))
    return {"predictor": predictor, "code": str(tmp_path / "code"), "source": source}


def test_working_dir_ships_the_predictor_to_a_cluster_without_it(gpu_cluster, shipped, tmp_path):
    sink = tmp_path / "out"
    env = {"working_dir": shipped["code"], "env_vars": {"ABP_FACTOR": "4"}}
    outcome = run_driver(gpu_cluster, JOB, {**shipped, "sink": str(sink), "runtime_env": env})
    assert "error" not in outcome, outcome
    assert [r["status"] for r in outcome["results"]] == ["computed"] * 3
    assert sink_ids(sink) == list(range(50))
    import pyarrow.dataset as ds

    table = ds.dataset(str(sink), format="parquet").to_table().sort_by("id")
    assert table.column("value").to_pylist() == [i * 0.5 * 4 for i in range(50)]  # the runtime_env's env_vars reached it too
    print(f"\nshipped with working_dir: 3 shards of 50 rows in {outcome['seconds']:.1f} s (replica start and upload included)")


def test_working_dir_ships_through_ray_client_too(gpu_cluster, shipped, tmp_path):
    """An Airflow worker outside the cluster's network (``ray://``) ships its code the same way:
    the upload goes through the Ray Client connection."""
    sink = tmp_path / "out"
    env = {"working_dir": shipped["code"], "env_vars": {"ABP_FACTOR": "3"}}
    outcome = run_driver(gpu_cluster, JOB, {**shipped, "sink": str(sink), "runtime_env": env}, address=gpu_cluster.client_address)
    assert "error" not in outcome, outcome
    assert sink_ids(sink) == list(range(50))
    import pyarrow.dataset as ds

    table = ds.dataset(str(sink), format="parquet").to_table().sort_by("id")
    assert table.column("value").to_pylist() == [i * 0.5 * 3 for i in range(50)]


def test_without_runtime_env_the_job_fails_at_once_saying_how_to_ship_the_code(gpu_cluster, shipped, tmp_path):
    outcome = run_driver(gpu_cluster, JOB, {**shipped, "sink": str(tmp_path / "out"), "runtime_env": None})
    error = outcome["error"]
    module = shipped["predictor"].split(":")[0]
    assert error["type"] == "PredictorError", error
    assert f"cannot import module {module!r}" in error["message"]
    assert "runtime_env" in error["message"] and "working_dir" in error["message"] and "install it" in error["message"]
    assert outcome["seconds"] < 60  # the replica's answer, not a lease timeout
    assert outcome["stopped"] == 0  # the replica that could not load was stopped by the caller already


def test_a_default_runtime_env_applies_only_to_a_spec_without_one_and_changes_no_fingerprint(tmp_path):
    from airflow_batch_provider.core.spec import JobSpec

    bare = JobSpec(source=str(tmp_path / "in.jsonl"), sink=str(tmp_path / "out"), predictor="m:C")
    default = {"working_dir": "s3://bucket/code.zip"}
    assert bare.with_runtime_env(default).runtime_env == default
    assert bare.with_runtime_env(None) is bare
    own = JobSpec(source=str(tmp_path / "in.jsonl"), sink=str(tmp_path / "out"), predictor="m:C", runtime_env={"pip": ["x"]})
    assert own.with_runtime_env(default) is own  # the spec's own wins, whole
    assert bare.with_runtime_env(default).fingerprint == own.fingerprint == bare.fingerprint


def test_a_runtime_env_is_described_by_its_keys_and_the_names_of_its_env_vars():
    from airflow_batch_provider.core.spec import describe_runtime_env

    env = {"working_dir": "/code", "env_vars": {"HF_TOKEN": "hf_secret", "HF_HOME": "/cache"}, "pip": ["torch"]}
    assert describe_runtime_env(env) == "env_vars (HF_HOME, HF_TOKEN), pip, working_dir"
    assert describe_runtime_env(None) == "none"
