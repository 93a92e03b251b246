"""The batch_inference DAG from S3 to S3 under ``airflow dags test``: SeaweedFS, local Ray.

Credentials come from an ``aws`` connection in ``AIRFLOW_CONN_*`` (JSON form) and reach the
Ray workers; the secret must appear in no log line, XCom value or rendered field. Each run is
a separate ``airflow dags test`` process, as a user would run it.
"""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import s3fs

from tests.helpers import ROOT
from tests.integration.dagtest import DagTester

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def tester(s3_server, tmp_path_factory):
    return DagTester(
        str(tmp_path_factory.mktemp("airflow_home_s3")),
        dag_id="abp_s3_integration",
        group_kwargs=", max_active_shards=2",
        connections={"aws_default": s3_server.connection_json(), "abp_lake": s3_server.connection_json()},
    )


def parquet_bytes(ids: range, row_group_size: int = 40) -> bytes:
    table = pa.table({"id": list(ids), "value": [i * 0.5 for i in ids]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    return buffer.getvalue()


def make_source(s3_server, bucket: str) -> int:
    """Two Parquet files of 40-row row groups: 200 + 120 rows, ids 0..319."""
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="in/a.parquet", Body=parquet_bytes(range(200)))
    client.put_object(Bucket=bucket, Key="in/b.parquet", Body=parquet_bytes(range(200, 320)))
    return 320


def spec_dict(bucket: str, **kwargs) -> dict:
    spec = {
        "source": f"s3://{bucket}/in/",
        "sink": f"s3://{bucket}/out",
        "predictor": "tests.predictors:Doubler",
        "source_format": "parquet",
        "rows_per_shard": 80,
        "batch_size": 40,
        "num_cpus": 0.5,
    }
    spec.update(kwargs)
    return spec


def read_sink(s3_server, bucket: str) -> pa.Table:
    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    return ds.dataset(f"{bucket}/out", filesystem=fs, format="parquet").to_table()


def computed_ids(calls_log: str) -> list[int]:
    if not os.path.exists(calls_log):
        return []
    with open(calls_log) as handle:
        return [i for line in handle for i in json.loads(line)]


def test_full_run_equals_direct_computation_and_no_secret_leaks(tester, s3_server, s3_bucket):
    rows = make_source(s3_server, s3_bucket)
    run = tester.run(spec_dict(s3_bucket))  # credentials: AIRFLOW_CONN_AWS_DEFAULT
    assert run.state == "success", run.output[-6000:]
    assert run.plan_counts() == (5, 0, 5)  # row groups of 40 in shards of 80: 3 + 2 shards
    table = read_sink(s3_server, s3_bucket).sort_by("id")
    assert table.column("id").to_pylist() == list(range(rows))
    assert table.column("value").to_pylist() == [i * 0.5 * 2 for i in range(rows)]
    manifest = json.loads(s3_server.client().get_object(Bucket=s3_bucket, Key="out/_SUCCESS")["Body"].read())
    assert (manifest["shards"], manifest["rows_out"]) == (5, rows)
    assert s3_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []

    # The secret reached the Ray workers (they wrote the parts) but no log, XCom or rendered field.
    assert s3_server.secret_key not in run.output
    assert tester.files_containing(s3_server.secret_key) == []
    assert tester.files_containing(s3_bucket), "sanity: the DB and logs do record this run"

    # The same spec with another model over the same sink fails closed, naming the change.
    changed = tester.run(spec_dict(s3_bucket, predictor_kwargs={"factor": 3}))
    assert changed.state == "failed"
    assert "different spec" in changed.output and "predictor_kwargs" in changed.output
    assert s3_server.secret_key not in changed.output


def test_failed_shards_then_rerun_computes_only_those(tester, s3_server, s3_bucket, tmp_path):
    rows = make_source(s3_server, s3_bucket)
    marker, calls = tmp_path / "fail", str(tmp_path / "calls.log")
    marker.write_text("fail while this exists")
    kwargs = {"calls_log": calls, "fail_marker": str(marker), "fail_mod": 150}  # ids 0, 150, 300
    # Airflow's s3://conn_id@bucket form picks the connection (abp_lake) from the URL.
    spec = spec_dict(s3_bucket, predictor_kwargs=kwargs)
    spec.update(source=f"s3://abp_lake@{s3_bucket}/in/", sink=f"s3://abp_lake@{s3_bucket}/out")
    first = tester.run(spec)
    assert first.state == "failed"
    assert "injected failure" in first.output
    marker.unlink()
    os.remove(calls)
    second = tester.run(spec)
    assert second.state == "success", second.output[-6000:]
    shards, committed, pending = second.plan_counts()
    assert (shards, committed, pending) == (5, 2, 3)
    # only the three failed shards' rows (80 + 80 + 40, holding ids 0, 150 and 300) ran again
    recomputed = sorted(computed_ids(calls))
    assert len(recomputed) == 200 and {0, 150, 300} <= set(recomputed)
    ids = read_sink(s3_server, s3_bucket).column("id").to_pylist()
    assert sorted(ids) == list(range(rows))


def test_sigkill_before_the_sentinel_then_rerun_leaves_each_row_once(tester, s3_server, s3_bucket, tmp_path):
    rows = make_source(s3_server, s3_bucket)
    killed = tmp_path / "killed-once"
    first = tester.run(spec_dict(s3_bucket), extra_env={"ABP_FAILPOINTS": f"before_sentinel=kill@{killed}"})
    assert killed.exists(), "the failpoint never fired"
    second = tester.run(spec_dict(s3_bucket))
    assert second.state == "success", (first.output[-3000:], second.output[-6000:])
    table = read_sink(s3_server, s3_bucket)
    ids = table.column("id").to_pylist()
    assert len(ids) == rows and sorted(ids) == list(range(rows))  # each row exactly once
    # the killed attempt's upload was never completed; finalize leaves it until idle past its
    # grace period (it could be another run's live attempt), `airflow-batch gc` removes it
    assert len(s3_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])) <= 1
    listed = s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="out/", Delimiter="/")
    parts = [o["Key"] for o in listed.get("Contents", []) if o["Key"].startswith("out/part-")]
    assert len(parts) == 5


def test_example_s3_parquet_dag(tester, s3_server, s3_bucket):
    """``dags/example_s3_parquet.py`` as shipped, pointed at the test server by env vars."""
    import shutil

    import numpy as np

    shutil.copy(os.path.join(ROOT, "dags", "example_s3_parquet.py"), tester.dags)
    n = 500
    rng = np.random.default_rng(7)
    features = pa.table(
        {
            "customer_id": np.arange(n),
            "tenure_months": rng.integers(1, 72, n),
            "monthly_spend": rng.uniform(10, 200, n).round(2),
            "support_tickets": rng.integers(0, 6, n),
            "notes": [f"unused {i}" for i in range(n)],
        }
    )
    buffer = io.BytesIO()
    pq.write_table(features, buffer, row_group_size=100)
    s3_server.client().put_object(Bucket=s3_bucket, Key="features/part-0.parquet", Body=buffer.getvalue())
    env = {
        "BATCH_S3_BUCKET": s3_bucket,
        "BATCH_S3_ROWS_PER_SHARD": "200",
        "BATCH_S3_NUM_CPUS": "0.5",
        "BATCH_S3_CONN_ID": "abp_lake",
    }
    run = tester.run(None, extra_env=env, dag_id="batch_inference_s3_parquet")
    assert run.state == "success", run.output[-6000:]
    assert run.plan_counts() == (3, 0, 3)
    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    scores = ds.dataset(f"{s3_bucket}/scores", filesystem=fs, format="parquet").to_table().sort_by("customer_id")
    assert scores.column_names == ["customer_id", "churn_probability"]
    logit = (
        -1.2
        - 0.04 * features.column("tenure_months").to_numpy()
        + 0.012 * features.column("monthly_spend").to_numpy()
        + 0.35 * features.column("support_tickets").to_numpy()
    )
    np.testing.assert_allclose(scores.column("churn_probability").to_numpy(), 1 / (1 + np.exp(-logit)))
    assert s3_server.secret_key not in run.output
