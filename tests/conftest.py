"""Shared fixtures: small input datasets and an isolated environment for Ray and Airflow
(what is shared but not a fixture is in ``tests/helpers.py``)."""

from __future__ import annotations

import os

import pytest

from tests.helpers import ROOT, rows, write_jsonl, write_parquet

# Ray workers import tests.predictors: they inherit PYTHONPATH. A new local Ray per test run
# (never someone else's cluster on this machine), and no token file from a `ray start`.
os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
os.environ.setdefault("RAY_ADDRESS", "local")


@pytest.fixture
def jsonl_source(tmp_path):
    """Two JSONL files, 250 + 130 rows, ids 0..379."""
    src = tmp_path / "in"
    write_jsonl(str(src / "a.jsonl"), rows(250))
    write_jsonl(str(src / "b.jsonl"), rows(130, start=250), trailing_newline=False)
    return str(src)


@pytest.fixture
def parquet_source(tmp_path):
    """Two Parquet files, 300 + 70 rows in row groups of 50, ids 0..369."""
    src = tmp_path / "pin"
    write_parquet(str(src / "a.parquet"), rows(300), row_group_size=50)
    write_parquet(str(src / "b.parquet"), rows(70, start=300), row_group_size=50)
    return str(src)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray (2 CPUs) in this process for the module's tests, in the provider's namespace."""
    import ray

    from airflow_batch_provider.core.ray.connection import NAMESPACE

    ray.init(num_cpus=2, namespace=NAMESPACE, logging_level="ERROR", include_dashboard=False)
    yield
    ray.shutdown()


from tests.s3_server import s3_bucket, s3_server  # noqa: E402,F401  (pytest fixtures, S3 on SeaweedFS)
