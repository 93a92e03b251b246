"""A Ray cluster with Ray's real autoscaler, for the autoscaling tests.

The head runs Ray's autoscaler (``ray start --head --autoscaling-config=...``, the v1 monitor)
with Ray's fake multi-node provider: the autoscaler launches real raylets on this machine, each
with the resources of its node type (virtual GPUs included), and terminates them once idle,
as it would cloud VMs. This is what ``ray.cluster_utils.AutoscalingCluster`` does, started the
way ``tests/ray_cluster.py`` starts its clusters instead, because ``AutoscalingCluster`` runs
``ray stop --force`` (every Ray process of the machine, other clusters included) and reads
``fake_multi_node/example.yaml``, which Ray's wheel does not ship: the provider is named as an
``external`` module, whose defaults are built in.

Everything runs under the head's ``ray start --block`` process (the autoscaler's nodes are its
descendants), so :meth:`AutoscalingRayCluster.stop` kills exactly this cluster's processes.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import free_port
from tests.ray_cluster import RayCluster, _wait

#: Ray's fake multi-node node provider, loaded as an ``external`` provider module.
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
#: what the fake provider calls the head node (its node id on the raylet too).
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
#: object store of each launched node: small, several raylets share this machine's memory.
NODE_OBJECT_STORE_BYTES = 80_000_000


def gpu_node_type(*, gpus: float = 1, cpus: float = 1, max_workers: int = 2, min_workers: int = 0, **resources: float) -> dict[str, Any]:
    """An autoscaler node type of ``gpus`` virtual GPUs (the default: scales from zero)."""
    return {
        "resources": {"CPU": cpus, "GPU": gpus, "object_store_memory": NODE_OBJECT_STORE_BYTES, **resources},
        "node_config": {},
        "min_workers": min_workers,
        "max_workers": max_workers,
    }


@dataclass
class AutoscalingRayCluster(RayCluster):
    """A head with ``head_cpus`` and no GPU, and the autoscaler's ``node_types``.

    ``idle_timeout_s``: how long a launched node stays without work before the autoscaler
    removes it (Ray counts it in minutes; fractions are allowed)."""

    node_types: dict[str, dict[str, Any]] = field(default_factory=lambda: {"gpu": gpu_node_type()})
    idle_timeout_s: float = 10.0
    upscaling_speed: float = 10.0
    #: Ray's autoscaler v2 (KubeRay's), which publishes the requests no node type can hold;
    #: False: the v1 monitor (the cluster launcher's default), which does not.
    autoscaler_v2: bool = True

    def env(self) -> dict[str, str]:
        """The environment of the head (and so of its autoscaler and the nodes it launches)."""
        env = self.driver_env()
        # The fake provider refuses to run without RAY_FAKE_CLUSTER; the autoscaler looks at
        # the cluster every second (its default is 5 s).
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        if self.autoscaler_v2:  # as ray.cluster_utils.AutoscalingCluster(autoscaler_v2=True) starts it
            env.update(RAY_enable_autoscaler_v2="1", RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
                       RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID)
        return env

    def driver_env(self) -> dict[str, str]:
        """The environment of a process that connects to this cluster (a test, a benchmark):
        token auth with this cluster's own token, as ``RayCluster``'s."""
        return super().env()

    def connect(self, namespace: str, *, log_to_driver: bool = True) -> None:
        """``ray.init`` this process into the cluster. Ray caches the auth token it read first
        (at the process's first connection): its own test helper drops that cache."""
        from ray._private.authentication_test_utils import reset_auth_token_state

        os.environ.update({k: v for k, v in self.driver_env().items() if k.startswith("RAY_AUTH")})
        reset_auth_token_state()
        import ray

        ray.init(address=self.address, namespace=namespace, logging_level="ERROR", log_to_driver=log_to_driver)
        # The v1 monitor publishes its status after its first round: until then the cluster
        # looks fixed (a real deployment's plan comes long after its cluster started).
        from airflow_batch_provider.core.ray.node_types import read_outlook

        _wait(lambda: read_outlook().autoscaler, 60, "the autoscaler to publish its state")

    @staticmethod
    def disconnect(saved_env: dict[str, str | None]) -> None:
        """``ray.shutdown`` and put the process's auth environment back as it was."""
        import ray
        from ray._private.authentication_test_utils import reset_auth_token_state

        ray.shutdown()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_auth_token_state()

    def config(self, gcs_address: str) -> dict[str, Any]:
        worker_total = sum(t["max_workers"] for t in self.node_types.values())
        return {
            "cluster_name": f"abp-{self.label}",
            "max_workers": worker_total,
            "upscaling_speed": self.upscaling_speed,
            "idle_timeout_minutes": self.idle_timeout_s / 60.0,
            "provider": {
                "type": "external",
                "module": FAKE_PROVIDER,
                "gcs_address": gcs_address,
                "head_node_id": FAKE_HEAD_NODE_ID,
                "use_node_id_as_ip": True,
                "launch_multiple": self.autoscaler_v2,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "auth": {"ssh_user": "nobody"},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": self.head_cpus}, "node_config": {}, "max_workers": 0},
                **self.node_types,
            },
            "head_node_type": "ray.head.default",
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }

    def start(self) -> AutoscalingRayCluster:
        self.temp_dir = Path(f"/tmp/abp-{self.label}-{os.getpid()}-{uuid.uuid4().hex[:4]}")
        self.temp_dir.mkdir()
        port = free_port()
        self.client_port = free_port()
        config_path = self.temp_dir / "autoscaling.json"
        config_path.write_text(json.dumps(self.config(f"127.0.0.1:{port}")))
        self._spawn("head", ["--head", f"--port={port}", f"--num-cpus={self.head_cpus}", "--num-gpus=0",
                             f"--temp-dir={self.temp_dir}", "--include-dashboard=false", f"--dashboard-port={free_port()}",
                             f"--ray-client-server-port={self.client_port}", f"--autoscaling-config={config_path}"])
        address_file = self.temp_dir / "ray_current_cluster"
        _wait(lambda: address_file.exists() and address_file.read_text().strip(), 120, "the Ray head")
        self.address = address_file.read_text().strip()
        return self

    def stop(self) -> None:
        """Kill the head's process tree: its autoscaler and every node the autoscaler launched
        (they are the autoscaler's child processes), and nothing else."""
        super().stop()


def node_types_of(cluster: AutoscalingRayCluster) -> dict[str, dict[str, Any]]:
    """The worker node types as given to the autoscaler (for messages in tests)."""
    return {name: dict(t["resources"]) for name, t in cluster.node_types.items()}
