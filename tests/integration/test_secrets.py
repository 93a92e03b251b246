"""Secrets stay out, end to end: a predictor API key from an Airflow connection and the Ray token.

A real Ray head with token auth (``ray start --head``, its own temp dir) and ``airflow dags test``
(SQLite). The predictor needs an ``api_key`` that the spec names as ``conn:abp_model_api``; the
run must succeed (the key reached the replica) while the key and the Ray token appear nowhere a
user or another process could read them: the run's output, the Airflow home (DB: XCom,
rendered fields, trigger kwargs; task logs), the sink (plan, sentinels, _SUCCESS, parts), Ray's
temp dir (session logs) and Ray's state API (jobs, actors, tasks, with details).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from airflow_batch_provider import BatchSpec
from tests.helpers import BIN, ROOT, free_ports, rows, write_jsonl
from tests.integration.dagtest import DagTester

pytestmark = pytest.mark.slow

API_KEY = "sk-live-abp-0123456789-model-api-key"


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """``ray start --head`` with token auth in its own temp dir, and its dashboard (which serves
    the state API): (address, token, temp dir, dashboard URL)."""
    temp_dir = f"/tmp/abp-secrets-{os.getpid()}"  # Ray's socket paths must stay short
    token_dir = tmp_path_factory.mktemp("ray_token")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "HOME": str(token_dir),
           "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([f"{BIN}/ray", "get-auth-token", "--generate"], env=env, capture_output=True, text=True, check=True)
    port, dashboard = free_ports(2)
    out = subprocess.run([f"{BIN}/ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                          f"--temp-dir={temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                          f"--dashboard-port={dashboard}", "--disable-usage-stats"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    token = open(token_dir / ".ray" / "auth_token").read().strip()
    address = re.search(r"ray start --address='([^']+)'", out.stdout + out.stderr).group(1)
    try:
        yield address, token, temp_dir, f"http://127.0.0.1:{dashboard}"
    finally:
        import psutil

        victims = [p for p in psutil.process_iter(["cmdline"]) if any(temp_dir in a for a in p.info["cmdline"] or [])]
        for proc in victims:
            proc.kill()
        psutil.wait_procs(victims, timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _files_containing(root: str, needle: str) -> list[str]:
    hits = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as handle:
                if needle.encode() in handle.read():
                    hits.append(path)
    return hits


STATE_DUMP = """
import json, sys
from ray.util import state
url = sys.argv[1]
dump = {
    "jobs": [str(j) for j in state.list_jobs(address=url, detail=True)],
    "actors": [str(a) for a in state.list_actors(address=url, detail=True)],
    "tasks": [str(t) for t in state.list_tasks(address=url, detail=True, limit=10000)],
    "objects": [str(o) for o in state.list_objects(address=url, detail=True, limit=10000)],
}
print("STATE", json.dumps(dump))
"""


def test_predictor_secret_and_ray_token_stay_out(ray_head, tmp_path):
    address, token, ray_temp, dashboard = ray_head
    connections = {
        "abp_model_api": json.dumps({"conn_type": "generic", "password": API_KEY}),
        "ray_batch_default": json.dumps({"conn_type": "ray_batch", "host": address, "password": token}),
    }
    tester = DagTester(str(tmp_path / "home"), dag_id="abp_secrets", connections=connections)
    write_jsonl(str(tmp_path / "in" / "a.jsonl"), rows(120))
    spec = BatchSpec(
        source=str(tmp_path / "in" / "*.jsonl"), sink=str(tmp_path / "out"), predictor="tests.predictors:KeyedDoubler",
        predictor_kwargs={"expected_sha256": hashlib.sha256(API_KEY.encode()).hexdigest()},
        predictor_secrets={"api_key": "conn:abp_model_api"}, rows_per_shard=50,
    )
    run = tester.run(spec, extra_env={"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"})
    assert run.state == "success", run.output[-4000:]
    manifest = json.load(open(tmp_path / "out" / "_SUCCESS"))
    assert manifest["rows_out"] == 120  # the replicas got the key: KeyedDoubler refuses a wrong one
    assert manifest["fingerprint_inputs"]["predictor_secrets"] == {"api_key": "conn:abp_model_api"}  # the name, not the value

    for secret in (API_KEY, token):
        assert secret not in run.output
        assert tester.files_containing(secret) == []  # Airflow home: DB (XCom, rendered fields), task logs
        assert _files_containing(str(tmp_path / "out"), secret) == []  # plan, sentinels, _SUCCESS, parts
    assert _files_containing(ray_temp, API_KEY) == []  # Ray's session logs and files

    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_TOKEN": token, "RAY_AUTH_MODE": "token"}
    out = subprocess.run([sys.executable, "-c", STATE_DUMP, dashboard], env=env, capture_output=True, text=True, timeout=120)
    dump = re.search(r"^STATE (.*)$", out.stdout, re.MULTILINE)
    assert dump, out.stdout[-2000:] + out.stderr[-2000:]
    states = json.loads(dump.group(1))
    assert any("Replica" in actor for actor in states["actors"])  # the replicas are in what was listed
    assert API_KEY not in dump.group(1) and token not in dump.group(1)


def test_the_ray_token_does_not_stay_in_the_environment(ray_head):
    """After connecting, Ray's client keeps the token; subprocesses and os.environ dumps do not see it."""
    address, token, _, _ = ray_head
    code = (
        "import os, sys, ray\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from airflow_batch_provider.core.api import RayTarget, connect\n"
        "target = RayTarget(address=sys.argv[1], token=sys.argv[2])\n"
        "assert sys.argv[2] not in repr(target)\n"
        "connect(target)\n"
        "print('ENV', 'RAY_AUTH_TOKEN' in os.environ)\n"
        "print('CALL', ray.get(ray.remote(num_cpus=0)(lambda: 'ok').remote()))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, "-c", code, address, token], env=env, capture_output=True, text=True, timeout=120)
    assert "ENV False" in out.stdout and "CALL ok" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
