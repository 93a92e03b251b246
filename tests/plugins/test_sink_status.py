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
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from airflow_batch_provider import BatchSpec
from tests.helpers import write_jsonl
from tests.integration.dagtest import DagTester

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PASSWORD = "pw-for-the-page-test"
SECRET = "wJalrXUtnFEMI-page-test-secret"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (make install puts it there with apt-get where it can)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, *, token: str | None = None, data: dict | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(data).encode() if data else None, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _wait_healthy(server: subprocess.Popen, base: str, log_path: str, timeout: float) -> None:
    """Wait until the api-server at ``base`` answers its health check (fail if it exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"api-server exited: {open(log_path).read()[-3000:]}")
        try:
            if _request(f"{base}/api/v2/monitor/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(1)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A finished batch run and an api-server over its Airflow home: (base URL, JWT, spec, tester)."""
    home = str(tmp_path_factory.mktemp("page_home"))
    data = tmp_path_factory.mktemp("page_data")
    write_jsonl(str(data / "in" / "a.jsonl"), [{"id": i, "value": float(i)} for i in range(250)])
    # An aws connection with a secret exists in this deployment: the page must never show it.
    conn = json.dumps({"conn_type": "aws", "login": "AKIDPAGE", "password": SECRET})
    tester = DagTester(home, dag_id="abp_page", connections={"abp_page_s3": conn})
    spec = BatchSpec(source=str(data / "in" / "*.jsonl"), sink=str(data / "out"), predictor="tests.predictors:Doubler",
                     rows_per_shard=100)
    run = tester.run(spec)
    assert run.state == "success", run.output[-3000:]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with open(os.path.join(home, "simple_auth_manager_passwords.json.generated"), "w") as handle:
        json.dump({"admin": PASSWORD}, handle)
    env = {**tester.env, "AIRFLOW__API__BASE_URL": base, "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin"}
    log = open(os.path.join(home, "api-server.log"), "w")
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "airflow"), "api-server", "-p", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(server, base, log.name, timeout=120)
        status, body = _request(f"{base}/auth/token", data={"username": "admin", "password": PASSWORD})
        assert status in (200, 201), body
        yield base, json.loads(body)["access_token"], spec, tester
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        log.close()


def test_the_page_needs_a_logged_in_user(served):
    base, _, spec, _ = served
    status, _ = _request(f"{base}/batch-sink-status/?dag_id=abp_page&task_id=batch_inference.plan")
    assert status in (401, 403)


def test_the_extra_link_opens_the_status_page_in_a_browser(served, tmp_path):
    from playwright.sync_api import sync_playwright

    base, token, spec, tester = served
    status, body = _request(f"{base}/api/v2/dags/abp_page/dagRuns?limit=1", token=token)
    run_id = json.loads(body)["dag_runs"][0]["dag_run_id"]
    status, body = _request(f"{base}/api/v2/dags/abp_page/dagRuns/{run_id}/taskInstances/batch_inference.shard/links?map_index=0",
                            token=token)
    assert status == 200, body
    link = json.loads(body)["extra_links"]["Sink status"]
    # The task ran with no [api] base_url: the link is relative to the api-server it is shown by,
    # and names the task, not its sink or connection (the page finds them in the DAG).
    assert link == "/batch-sink-status/?dag_id=abp_page&task_id=batch_inference.shard"
    link = base + link

    status, body = _request(link.replace("/?", "/status.json?"), token=token)
    figures = json.loads(body)
    assert status == 200, figures
    assert (figures["committed"], figures["pending"], figures["rows_in"], figures["quarantined"]) == (3, 0, 250, 0)

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
