"""The sink status page in a real api-server, seen in a real browser (headless Chromium).

A batch DAG runs with ``airflow dags test`` (SQLite, local Ray); an ``airflow api-server`` on the
same Airflow home then serves the plugin. The test follows the shard task's "Sink status" extra
link from the REST API into Chromium and asserts what the page shows; a screenshot stays in the
test's temp dir.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from airflow_batch_provider import BatchSpec
from tests.helpers import api_server, http_request, write_jsonl
from tests.integration.dagtest import DagTester

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PASSWORD = "pw-for-the-page-test"
SECRET = "wJalrXUtnFEMI-page-test-secret"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (make install puts it there with apt-get where it can)"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A finished batch run and an api-server over its Airflow home: (base URL, JWT, spec, tester)."""
    home = str(tmp_path_factory.mktemp("page_home"))
    data = tmp_path_factory.mktemp("page_data")
    write_jsonl(str(data / "in" / "a.jsonl"), [{"id": i, "value": float(i)} for i in range(250)])
    # An aws connection with a secret exists in this deployment: the page must never show it.
    conn = json.dumps({"conn_type": "aws", "login": "AKIDPAGE", "password": SECRET})
    tester = DagTester(home, dag_id="abp_page", connections={"abp_page_s3": conn})
    spec = BatchSpec(source=str(data / "in" / "*.jsonl"), sink=str(data / "out"), predictor="tests.predictors:CountingDoubler",
                     rows_per_shard=100, gpu_hour_price=2.5)
    run = tester.run(spec)
    assert run.state == "success", run.output[-3000:]
    with open(os.path.join(home, "simple_auth_manager_passwords.json.generated"), "w") as handle:
        json.dump({"admin": PASSWORD}, handle)
    env = {**tester.env, "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin"}
    with api_server(env, os.path.join(home, "api-server.log"), timeout=120) as base:
        status, body = http_request(f"{base}/auth/token", data={"username": "admin", "password": PASSWORD})
        assert status in (200, 201), body
        yield base, json.loads(body)["access_token"], spec, tester


def test_the_page_needs_a_logged_in_user(served):
    base, _, spec, _ = served
    status, _ = http_request(f"{base}/batch-sink-status/?dag_id=abp_page&task_id=batch_inference.plan")
    assert status in (401, 403)


def test_the_extra_link_opens_the_status_page_in_a_browser(served, tmp_path):
    from playwright.sync_api import sync_playwright

    base, token, spec, tester = served
    status, body = http_request(f"{base}/api/v2/dags/abp_page/dagRuns?limit=1", token=token)
    run_id = json.loads(body)["dag_runs"][0]["dag_run_id"]
    status, body = http_request(f"{base}/api/v2/dags/abp_page/dagRuns/{run_id}/taskInstances/batch_inference.shard/links?map_index=0",
                                token=token)
    assert status == 200, body
    link = json.loads(body)["extra_links"]["Sink status"]
    # The task ran with no [api] base_url: the link is relative to the api-server it is shown by,
    # and names the task, not its sink or connection (the page finds them in the DAG).
    assert link == "/batch-sink-status/?dag_id=abp_page&task_id=batch_inference.shard"
    link = base + link

    status, body = http_request(link.replace("/?", "/status.json?"), token=token)
    figures = json.loads(body)
    assert status == 200, figures
    assert (figures["committed"], figures["pending"], figures["rows_in"], figures["quarantined"]) == (3, 0, 250, 0)
    assert (figures["counters"]["tokens_out"], figures["gpu_hour_price"], figures["cost"]) == (750, 2.5, 0.0)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.add_cookies([{"name": "_token", "value": token, "url": base}])
        page = context.new_page()
        page.goto(link)
        shown = {el.get_attribute("data-figure"): el.inner_text() for el in page.query_selector_all("[data-figure]")}
        assert shown["Shards committed"] == "3 of 3"
        assert shown["Shards pending"] == "0" and shown["Shards quarantined"] == "0"
        assert shown["Rows in"] == "250 of 250" and shown["Rows out"] == "250" and shown["Rows rejected"] == "0"
        assert shown["Finalized"].endswith("UTC")
        # the predictor's counters (docs/counting.md): tokens, tokens/s beside rows/s; GPU-hours and their cost
        assert shown["Tokens in"] == f"{sum(range(250)) + 250:,}" and shown["Tokens out"] == "750"
        assert shown["Tokens out/s"] != "" and shown["Throughput"].endswith("rows/s")
        assert shown["GPU-hours"] == "0.000" and shown["Cost"] == "0.00 at 2.5 per GPU-hour"  # num_gpus=0
        assert page.locator("#throughput rect").count() >= 1
        assert page.locator("#commits tr").count() == 4  # header + 3 commits
        page.screenshot(path=str(tmp_path / "sink-status.png"), full_page=True)
        html = page.content()
        assert SECRET not in html and "AKIDPAGE" not in html

        # The same page in the Airflow UI, under the "Batch sinks" navigation entry.
        page.goto(f"{base}/plugin/batch-sinks")
        page.wait_for_selector("iframe", timeout=60_000)
        frame = page.frame_locator("iframe")
        assert frame.locator(f"#sinks a:text('{spec.sink}')").count() == 1  # the sinks of the DAGs this user may read
        page.screenshot(path=str(tmp_path / "sink-status-in-ui.png"), full_page=True)
        browser.close()
    assert os.path.getsize(tmp_path / "sink-status.png") > 10_000
    assert not tester.files_containing(SECRET)  # not in the DB (XCom, rendered fields) nor in logs in clear
