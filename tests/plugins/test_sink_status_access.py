"""Who may see which sink on the status page, in a real api-server (no browser needed).

The page is asked for a task (dag_id, task_id): the user must be allowed to read the DAG, and the
sink, checkpoint and connection come from the DAG's serialized spec; a path, checkpoint or
connection in the query is refused; errors reading a sink are one fixed sentence. The DAGs are
serialized with ``airflow dags reserialize`` and their sink filled by the core in this process
(no Ray); the api-server runs with ``tests.plugins.auth_manager`` (per-DAG access).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from airflow_batch_provider import BatchSpec
from airflow_batch_provider.core.domain.commit import new_attempt
from airflow_batch_provider.core.domain.jobs import finalize_job, plan_job
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.execution.runner import ShardRunner
from airflow_batch_provider.plugins.sink_status import CANNOT_READ
from tests.helpers import ROOT, api_server, http_request, write_jsonl
from tests.integration.dagtest import DagTester

pytestmark = pytest.mark.slow

DAG_ID = "abp_page_access"
S3_DAG = '''
import pendulum
from airflow.sdk import dag
from airflow_batch_provider import BatchSpec, batch_inference


@dag(dag_id="abp_page_missing_conn", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def missing_conn():
    batch_inference(BatchSpec(source="s3://abp-bucket/in/", sink="s3://abp-bucket/out", predictor="tests.predictors:Doubler",
                              source_format="jsonl", storage_conn_id="abp_no_such_conn"))


missing_conn()
'''
USERS = {"reader": "pw-reader", "outsider": "pw-outsider"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An api-server over two serialized batch DAGs, one with a finalized local sink: (base URL, tokens, spec, log)."""
    home = str(tmp_path_factory.mktemp("access_home"))
    data = tmp_path_factory.mktemp("access_data")
    write_jsonl(str(data / "in" / "a.jsonl"), [{"id": i, "value": float(i)} for i in range(250)])
    spec = BatchSpec(source=str(data / "in" / "*.jsonl"), sink=str(data / "out"), predictor="tests.predictors:Doubler",
                     rows_per_shard=100)
    tester = DagTester(home, dag_id=DAG_ID)
    with open(os.path.join(tester.dags, "abp_page_missing_conn.py"), "w") as handle:
        handle.write(S3_DAG)
    spec_path = os.path.join(home, "spec.json")
    with open(spec_path, "w") as handle:
        json.dump(spec.to_dict(), handle)
    env = {**tester.env, "ABP_TEST_SPEC": spec_path}
    airflow = os.path.join(os.path.dirname(sys.executable), "airflow")
    done = subprocess.run([airflow, "dags", "reserialize"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]

    core = spec.core()  # the sink as a finished run leaves it, computed here without Ray
    storage = JobStorage.for_spec(core)
    runner = ShardRunner(core)
    for shard in plan_job(core, storage).pending:
        runner.run(shard, new_attempt())
    finalize_job(core, storage)

    with open(os.path.join(home, "simple_auth_manager_passwords.json.generated"), "w") as handle:
        json.dump(USERS, handle)
    env.update({
        "AIRFLOW__CORE__AUTH_MANAGER": "tests.plugins.auth_manager.OneDagAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "reader:viewer,outsider:viewer",
    })
    log_path = os.path.join(home, "api-server.log")
    with api_server(env, log_path, timeout=180, cwd=ROOT) as base:
        tokens = {}
        for user, password in USERS.items():
            status, body = http_request(f"{base}/auth/token", data={"username": user, "password": password})
            assert status in (200, 201), body
            tokens[user] = json.loads(body)["access_token"]
        yield base, tokens, spec, log_path


PAGE = "/batch-sink-status"
TASK = f"dag_id={DAG_ID}&task_id=batch_inference.plan"


def test_a_user_who_may_read_the_dag_sees_its_sinks_status(served):
    base, tokens, spec, _ = served
    status, body = http_request(f"{base}{PAGE}/status.json?{TASK}", token=tokens["reader"])
    assert status == 200, body
    figures = json.loads(body)
    assert (figures["sink"], figures["committed"], figures["pending"], figures["rows_in"]) == (spec.sink, 3, 0, 250)
    assert figures["healthy"] and figures["finalized_at"]
    status, body = http_request(f"{base}{PAGE}/?{TASK}", token=tokens["reader"])
    assert status == 200 and b"3 of 3" in body
    status, body = http_request(f"{base}{PAGE}/", token=tokens["reader"])  # the index: the sinks of the DAGs they may read
    assert status == 200 and spec.sink.encode() in body and b"s3://abp-bucket/out" in body


def test_a_viewer_without_access_to_the_dag_gets_403_and_no_sink(served):
    base, tokens, spec, _ = served
    for path in (f"/status.json?{TASK}", f"/?{TASK}", "/status.json?dag_id=abp_no_such_dag&task_id=x"):
        status, body = http_request(f"{base}{PAGE}{path}", token=tokens["outsider"])
        assert status == 403, (path, body)
        assert spec.sink.encode() not in body
    status, body = http_request(f"{base}{PAGE}/", token=tokens["outsider"])
    assert status == 200 and spec.sink.encode() not in body and b"No batch inference task" in body


@pytest.mark.parametrize("query", ["sink=/etc", "checkpoint_dir=/etc/passwd", "conn_id=aws_default"])
def test_a_path_checkpoint_or_connection_in_the_query_is_refused(served, query):
    base, tokens, _, _ = served
    for path in (f"/status.json?{TASK}&{query}", f"/?{query}"):
        status, body = http_request(f"{base}{PAGE}{path}", token=tokens["reader"])
        assert status == 400, (path, body)
        assert b"dag_id and task_id only" in body and b"passwd\"" not in body


def test_a_task_that_is_not_a_batch_task_is_404(served):
    base, tokens, _, _ = served
    status, _ = http_request(f"{base}{PAGE}/status.json?dag_id={DAG_ID}&task_id=no_such_task", token=tokens["reader"])
    assert status == 404


def test_an_unreadable_sink_gives_one_fixed_sentence_and_the_log_the_cause(served):
    base, tokens, _, log_path = served
    status, body = http_request(f"{base}{PAGE}/status.json?dag_id=abp_page_missing_conn&task_id=batch_inference.plan",
                                token=tokens["reader"])
    assert status == 503 and json.loads(body) == {"error": CANNOT_READ}
    time.sleep(0.5)
    assert "abp_no_such_conn" in open(log_path).read()  # the cause, for the operator
