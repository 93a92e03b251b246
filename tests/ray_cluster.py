"""A real multi-node Ray cluster on loopback, for the lost-node and several-cluster tests.

``ray start --head`` with token auth (``RAY_AUTH_MODE=token``, a token of its own handed in
``RAY_AUTH_TOKEN``, so ``~/.ray/auth_token`` is never written), then worker nodes joined with
``ray start --address=...``, each with its own CPUs, ports and custom resource
(``node_<name>``). Every node runs ``--block`` in a session of its own, so that killing its
process group kills its raylet and every worker process it started: a lost node. Only these
process groups are ever killed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import BIN, ROOT, free_port


@dataclass
class RayNode:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pgid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
            return True
        except ProcessLookupError:
            return False



@dataclass
class RayCluster:
    """A head (``head_cpus``, 0: it runs no replica) and worker nodes added with :meth:`add_node`."""

    label: str
    head_cpus: int = 0
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    nodes: dict[str, RayNode] = field(default_factory=dict)
    address: str = ""
    temp_dir: Path = Path()
    client_port: int = 0  # the head's Ray Client server (``ray://127.0.0.1:{client_port}``)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        return env

    def conn_uri(self) -> str:
        """An ``AIRFLOW_CONN_*`` value for this cluster (``ray_batch`` connection)."""
        return json.dumps({"conn_type": "ray_batch", "host": self.address, "password": self.token})

    @property
    def client_address(self) -> str:
        """The head's Ray Client address (``ray://``), as an Airflow worker outside the cluster names it."""
        return f"ray://127.0.0.1:{self.client_port}"

    def start(self) -> RayCluster:
        # Ray's socket paths must stay short: a temp dir under /tmp.
        self.temp_dir = Path(f"/tmp/abp-{self.label}-{os.getpid()}-{uuid.uuid4().hex[:4]}")
        self.temp_dir.mkdir()
        port = free_port()
        self.client_port = free_port()
        self._spawn("head", ["--head", f"--port={port}", f"--num-cpus={self.head_cpus}", "--num-gpus=0",
                             f"--temp-dir={self.temp_dir}", "--include-dashboard=false", f"--dashboard-port={free_port()}",
                             f"--ray-client-server-port={self.client_port}"])
        address_file = self.temp_dir / "ray_current_cluster"
        _wait(lambda: address_file.exists() and address_file.read_text().strip(), 120, "the Ray head")
        self.address = address_file.read_text().strip()
        return self

    def add_node(self, name: str, cpus: float = 1, *, gpus: float = 0, resources: dict[str, float] | None = None,
                 memory: int | None = None) -> RayNode:
        """Join a worker node, and wait until it is alive (one at a time: raylets starting side by
        side on a busy 2-core machine time out). A node that fails to start is started again once.

        ``gpus`` are virtual (Ray counts them; no device is needed), ``resources`` are custom ones
        besides ``node_<name>`` (``{"accelerator_type:H100": 1}`` makes it an H100 node to Ray's
        ``accelerator_type`` option), ``memory`` is the bytes of Ray's ``memory`` resource."""
        custom = json.dumps({f"node_{name}": 1, **(resources or {})})
        args = [f"--address={self.address}", f"--num-cpus={cpus:g}", f"--num-gpus={gpus:g}", f"--resources={custom}"]
        if memory is not None:
            args.append(f"--memory={memory}")
        alive = 1 + sum(1 for n, node in self.nodes.items() if n != "head" and node.popen.poll() is None)
        for attempt in range(2):
            node = self._spawn(name, args)
            try:
                self.wait_nodes(alive + 1, timeout=90)
                return node
            except RuntimeError:
                if attempt:
                    raise
                if node.popen.poll() is None:
                    self.kill_node(name)
        raise AssertionError("unreachable")

    def _spawn(self, name: str, args: list[str]) -> RayNode:
        ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                 f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                 "--min-worker-port=0", "--max-worker-port=0"]
        log = self.temp_dir / f"{name}.out"
        cmd = [os.path.join(BIN, "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
               "--object-store-memory=100000000", *ports, *args]
        popen = subprocess.Popen(cmd, env=self.env(), stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        node = self.nodes[name] = RayNode(name, popen, log)
        return node

    def wait_nodes(self, count: int, timeout: float = 180) -> None:
        """Wait until ``count`` nodes (the head included) are alive in the cluster."""
        probe = (
            "import ray, time\n"
            f"ray.init(address={self.address!r}, logging_level='ERROR')\n"
            f"deadline = time.monotonic() + {timeout}\n"
            f"while sum(n['Alive'] for n in ray.nodes()) < {count} and time.monotonic() < deadline:\n"
            "    time.sleep(0.5)\n"
            "print('alive', sum(n['Alive'] for n in ray.nodes()))\n"
        )
        out = subprocess.run([sys.executable, "-c", probe], env=self.env(), capture_output=True, text=True, timeout=timeout + 60)
        if f"alive {count}" not in out.stdout:
            logs = {name: node.log.read_text()[-1500:] for name, node in self.nodes.items()}
            raise RuntimeError(f"the Ray cluster did not reach {count} nodes: {out.stdout} {out.stderr[-2000:]} {logs}")

    def kill_node(self, name: str) -> None:
        """Lose a node: SIGKILL its raylet and every process it started (its worker processes
        run in process groups of their own, so they are found as its descendants)."""
        import psutil

        node = self.nodes[name]
        try:
            victims = psutil.Process(node.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            victims = []
        os.killpg(node.pgid, signal.SIGKILL)
        for proc in victims:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        node.popen.wait(timeout=30)

    def node_of(self, pid: int) -> str | None:
        """The name of the node that started process ``pid`` (its raylet's ``ray start``)."""
        import psutil

        try:
            ancestors = {proc.pid for proc in psutil.Process(pid).parents()} | {pid}
        except psutil.NoSuchProcess:
            return None
        return next((name for name, node in self.nodes.items() if node.popen.pid in ancestors), None)

    def stop(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + (["head"] if "head" in self.nodes else []):
            if self.nodes[name].popen.poll() is None:
                self.kill_node(name)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.3)
    return value
