"""Shared fixtures: small input datasets and an isolated environment for Ray and Airflow."""

from __future__ import annotations

import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Ray workers import tests.predictors: they inherit PYTHONPATH. A new local Ray per test run
# (never someone else's cluster on this machine), and no token file from a `ray start`.
os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
os.environ.setdefault("RAY_ADDRESS", "local")


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": i, "value": float(i) * 0.5, "text": f"text {i}"} for i in range(start, start + n)]


def write_jsonl(path: str, records: list[dict], *, trailing_newline: bool = True) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    body = "\n".join(json.dumps(r) for r in records)
    with open(path, "w") as handle:
        handle.write(body + ("\n" if trailing_newline and records else ""))
    return path


def write_parquet(path: str, records: list[dict], *, row_group_size: int = 100) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


@pytest.fixture
def jsonl_source(tmp_path):
    """Two JSONL files, 250 + 130 rows, ids 0..379."""
    src = tmp_path / "in"
    write_jsonl(str(src / "a.jsonl"), rows(250))
    write_jsonl(str(src / "b.jsonl"), rows(130, start=250), trailing_newline=False)
    return str(src)


@pytest.fixture
def parquet_source(tmp_path):
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
