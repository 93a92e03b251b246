"""A process whose connection to Ray fails for a reason of Ray's connects again, within the
time its caller gives it, with its token; one that never can fails naming where and why.

Each case runs in a child process (``ray.init`` holds a process for life) against a real Ray
head with token auth; the failure is injected just before ``ray.init`` (``ray_connect``
failpoint), once or every time.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.ray_cluster import RayCluster

pytestmark = pytest.mark.slow

CHILD = textwrap.dedent(
    """
    import logging, os, sys, time
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
    from airflow_batch_provider.core.ray.connection import RayTarget, connect
    started = time.monotonic()
    try:
        connect(RayTarget(address=sys.argv[1], token=sys.argv[2]), timeout_s=float(sys.argv[3]))
    except Exception as err:
        print("FAILED", type(err).__name__, err)
        sys.exit(3)
    import ray
    print("CONNECTED", ray.cluster_resources().get("CPU"), round(time.monotonic() - started, 1))
    print("TOKEN_IN_ENV", "RAY_AUTH_TOKEN" in os.environ)
    """
)


@pytest.fixture(scope="module")
def head():
    cluster = RayCluster("connect", head_cpus=1).start()
    cluster.wait_nodes(1)
    yield cluster
    cluster.stop()


def _child(head: RayCluster, failpoint: str, timeout_s: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in head.env().items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}  # the token comes in the target only
    env["ABP_FAILPOINTS"] = failpoint
    return subprocess.run([sys.executable, "-c", CHILD, head.address, head.token, str(timeout_s)],
                          env=env, capture_output=True, text=True, timeout=300)


def test_a_failed_connection_is_tried_again_with_the_token(head, tmp_path):
    out = _child(head, f"ray_connect=raise@{tmp_path / 'fired'}", timeout_s=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Could not connect to Ray at" in out.stdout and "attempt 1" in out.stdout
    assert "CONNECTED 1.0" in out.stdout  # the second attempt reached the cluster, token and all
    assert "TOKEN_IN_ENV False" in out.stdout
    assert head.token not in out.stdout + out.stderr


def test_a_connection_that_never_succeeds_fails_naming_the_cluster(head):
    out = _child(head, "ray_connect=raise", timeout_s=4)
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    failed = next(line for line in out.stdout.splitlines() if line.startswith("FAILED"))
    assert "RayWorkError" in failed and head.address in failed and "attempts in 4 s" in failed
    assert "check that the cluster is up" in failed
    assert head.token not in out.stdout + out.stderr


def test_a_ray_client_server_that_is_not_up_is_tried_again_and_then_named_not_hung_on():
    """Ray 2.60's client can hang for good closing a failed ``ray://`` connect; a server that
    does not listen is found out by a TCP check first, and tried again like any failed attempt."""
    from tests.helpers import free_port

    address = f"ray://127.0.0.1:{free_port()}"
    out = subprocess.run([sys.executable, "-c", CHILD, address, "not-a-token", "4"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    failed = next(line for line in out.stdout.splitlines() if line.startswith("FAILED"))
    assert "RayWorkError" in failed and address in failed and "ConnectionRefusedError" in failed
    assert "Could not connect to Ray at" in out.stdout  # tried again before giving up
