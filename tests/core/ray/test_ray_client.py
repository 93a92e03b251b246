"""Ray Client (``ray://``): an Airflow worker outside the cluster's network runs and follows
its shards through the head's client server, token auth on; a connection that drops
mid-shard is taken up again within the try, and the shard commits once.

A real head (``ray start --head --ray-client-server-port``, token auth) serves every case;
each case's client runs in a child process (``ray.init`` holds a process for life). The
network between client and cluster is :class:`~tests.tcp_proxy.TcpProxy`, real sockets that
the test cuts (every connection closed, new ones refused) and restores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.helpers import logged_ids, rows, sink_ids, write_jsonl
from tests.ray_cluster import RayCluster
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

#: argv: address token source sink calls_log entered_log sleep_s
CHILD = textwrap.dedent(
    """
    import hashlib, json, logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(levelname)s %(message)s")
    from airflow_batch_provider.core.domain.jobs import plan_job
    from airflow_batch_provider.core.ray import connection
    from airflow_batch_provider.core.ray.call import ShardCall
    from airflow_batch_provider.core.ray.connection import RayTarget, connect
    from airflow_batch_provider.core.ray.pool import ReplicaPool
    from airflow_batch_provider.core.spec import JobSpec

    address, token, source, sink, calls_log, entered_log, sleep_s = sys.argv[1:8]
    connect(RayTarget(address=address, token=token), timeout_s=60)
    import ray
    print("JOB", ray.get_runtime_context().get_job_id(), flush=True)
    secret = "sk-client-0a1b2c3d"
    spec = JobSpec(source=source, source_format="jsonl", sink=sink, predictor="tests.predictors:KeyedSlowDoubler",
                   predictor_kwargs={"expected_sha256": hashlib.sha256(secret.encode()).hexdigest(), "sleep_s": float(sleep_s),
                                     "calls_log": calls_log, "entered_log": entered_log},
                   predictor_secrets={"api_key": "var:model_api_key"}, batch_size=5, rows_per_shard=10, num_replicas=1)
    pool = ReplicaPool(spec, secrets={"api_key": secret})  # the secret goes to the replica by ray.put, through the client
    pending = plan_job(spec).pending
    call = ShardCall(pool, [s.to_dict() for s in pending], unit="all", label="all", log=logging.getLogger("call"))
    work = call.submit()
    print("SUBMITTED", json.dumps(work.to_dict()), flush=True)
    results = call.follow(work)
    print("RESULTS", json.dumps([r.status for r in results]), "SESSION", connection.session(), flush=True)
    print("NAMED", json.dumps(ray.util.list_named_actors(all_namespaces=True)), flush=True)
    if "--driver" in sys.argv:  # how a trigger follows a call: a Ray client child of its own, same address
        from airflow_batch_provider.core.ray.driver import InProcessDriver, RayDriver
        print("IN_PROCESS", isinstance(RayDriver.for_target(RayTarget(address=address, token=token)), InProcessDriver))
        driver = RayDriver(RayTarget(address=address, token=token))
        print("DRIVER", driver.call("status", spec.to_dict(), work=work.to_dict())["state"], flush=True)
        driver.stop()
    pool.shutdown(force=True)
    """
)


@pytest.fixture(scope="module")
def head():
    cluster = RayCluster("client", head_cpus=1).start()
    cluster.wait_nodes(1)
    yield cluster
    cluster.stop()


@pytest.fixture
def job(tmp_path):
    source = tmp_path / "in"
    write_jsonl(str(source / "a.jsonl"), rows(30))  # 3 shards of 10 rows, 2 batches each
    return {"source": str(source), "sink": str(tmp_path / "out"), "calls": tmp_path / "calls.log", "entered": tmp_path / "entered.log"}


def _client_env(head: RayCluster, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in head.env().items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}  # the token comes in the target only
    env.update(extra)
    return env


def _run(head, job, address, *, sleep_s, env=None, during=None, extra=()) -> tuple[str, int | None]:
    """Run the child to its end; ``during`` runs in a thread once its predictor is inside the
    first batch. Returns its output (time-stamped lines) and how many batches the predictor
    had entered when the child said it follows its call again (None: it never said so)."""
    args = [sys.executable, "-u", "-c", CHILD, address, head.token, job["source"], job["sink"], str(job["calls"]),
            str(job["entered"]), str(sleep_s), *extra]
    proc = subprocess.Popen(args, env=env or _client_env(head), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = time.monotonic()
    lines = []
    entered_at_refollow = None
    killer = threading.Timer(240, proc.kill)
    killer.start()
    try:
        for line in proc.stdout:
            lines.append(f"[{time.monotonic() - started:5.1f}] {line}")
            if line.startswith("SUBMITTED") and during is not None:
                threading.Thread(target=_when_entered, args=(job["entered"], during), daemon=True).start()
            if "again by its id" in line:
                entered_at_refollow = len(job["entered"].read_text().splitlines())
        proc.wait()
    finally:
        killer.cancel()
    out = "".join(lines)
    assert proc.returncode == 0, out[-6000:]
    return out, entered_at_refollow


def _when_entered(entered_log, action) -> None:
    deadline = time.monotonic() + 60
    while not (entered_log.exists() and entered_log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    action()


def _committed_once(job) -> None:
    assert sink_ids(job["sink"]) == list(range(30))  # every row in the sink, once
    assert sorted(logged_ids(job["calls"])) == list(range(30))  # and computed once: the call was never started again


def test_a_job_runs_through_ray_client_with_token_auth(head, job):
    out, _ = _run(head, job, head.client_address, sleep_s=0.1, extra=["--driver"])
    assert 'RESULTS ["computed", "computed", "computed"] SESSION 1' in out
    named = json.loads(out.split("NAMED ", 1)[1].splitlines()[0])
    assert any(entry["namespace"] == "airflow_batch_provider" and entry["name"].startswith("abp-") for entry in named)
    assert "IN_PROCESS True" in out  # a trigger in this process asks through its own connection
    assert "DRIVER SUCCEEDED" in out  # and a Ray client child process connects to the same ray:// address
    _committed_once(job)
    assert head.token not in out and "sk-client-0a1b2c3d" not in out


def test_ray_client_refuses_a_wrong_token(head):
    child = ("import sys\nfrom airflow_batch_provider.core.ray.connection import RayTarget, connect\n"
             "try:\n    connect(RayTarget(address=sys.argv[1], token='0' * 64), timeout_s=3)\n"
             "except Exception as err:\n    print('FAILED', type(err).__name__, err)\nelse:\n    print('CONNECTED')\n")
    out = subprocess.run([sys.executable, "-c", child, head.client_address], env=_client_env(head), capture_output=True, text=True, timeout=180)
    assert "FAILED RayWorkError" in out.stdout and head.client_address in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


def test_a_connection_dropped_mid_shard_is_taken_up_again_by_ray_client(head, job):
    """Within Ray Client's reconnect grace period the client reconnects by itself: the follow
    goes on in the same session, and the shard commits once."""
    with TcpProxy(("127.0.0.1", head.client_port)) as proxy:
        def drop():
            proxy.cut()
            time.sleep(5)
            proxy.restore()

        out, _ = _run(head, job, f"ray://127.0.0.1:{proxy.port}", sleep_s=1.5, during=drop)
    assert proxy.cuts == 1 and proxy.accepted >= 2  # cut, and connected again through the proxy
    assert 'RESULTS ["computed", "computed", "computed"] SESSION 1' in out, out[-4000:]
    _committed_once(job)


def test_a_connection_lost_past_the_grace_period_is_connected_again_and_the_call_followed_by_its_id(head, job):
    """Past the grace period (2 s here) Ray Client gives up and raises ConnectionError: the
    shard call connects again (a new Ray session, a new job) and follows the call, which ran
    on in its detached replica, by its work id; the shard commits once, within the try."""
    with TcpProxy(("127.0.0.1", head.client_port)) as proxy:
        def drop():
            proxy.cut()
            time.sleep(10)  # Ray Client gives up about 5 s after the cut here (its grace, then its own tries)
            proxy.restore()

        out, entered = _run(head, job, f"ray://127.0.0.1:{proxy.port}", sleep_s=4, during=drop,
                            env=_client_env(head, RAY_CLIENT_RECONNECT_GRACE_PERIOD="2"))
    assert "The connection to Ray was lost while following shard(s) all" in out, out[-4000:]
    assert entered is not None and entered < 6, out[-4000:]  # followed again while the call still ran (6 batches in all)
    assert 'RESULTS ["computed", "computed", "computed"] SESSION 2' in out, out[-4000:]
    _committed_once(job)
    assert head.token not in out


DRIVER_CHILD = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    from airflow_batch_provider.core.ray.connection import RayTarget
    from airflow_batch_provider.core.ray.driver import RayDriver
    spec = {"source": "/tmp/in", "source_format": "jsonl", "sink": "/tmp/out", "predictor": "tests.predictors:Doubler"}
    driver = RayDriver(RayTarget(address=sys.argv[1], token=sys.argv[2]))
    work = {"worker": "abp-000000000000-0", "token": "t"}
    print("ASKED", driver.call("status", spec, work=work)["state"], flush=True)
    sys.stdin.readline()  # the network was cut past the grace period, and restored
    print("ASKED", driver.call("status", spec, work=work)["state"], flush=True)
    driver.stop()
    """
)


def test_a_triggers_ray_client_process_connects_again_after_a_lost_connection(head):
    """The trigger's Ray client child (RayDriver) answers again after its connection was lost
    past the grace period: it connects again and asks again (no replica by that name: LOST)."""
    with TcpProxy(("127.0.0.1", head.client_port)) as proxy:
        proc = subprocess.Popen([sys.executable, "-u", "-c", DRIVER_CHILD, f"ray://127.0.0.1:{proxy.port}", head.token],
                                env=_client_env(head, RAY_CLIENT_RECONNECT_GRACE_PERIOD="2"), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            seen = [proc.stdout.readline()]
            while seen[-1] and not seen[-1].startswith("ASKED"):
                seen.append(proc.stdout.readline())
            assert seen[-1].strip() == "ASKED LOST", "".join(seen)[-4000:]
            proxy.cut()
            time.sleep(10)  # Ray Client gives up after its grace period (2 s, then its own tries: about 5 s)
            proxy.restore()
            out, _ = proc.communicate("go\n", timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0 and "ASKED LOST" in out, out[-4000:]
    assert "The connection to Ray at ray://" in out and "was lost (" in out and "connecting again" in out, out[-4000:]
    assert head.token not in out
