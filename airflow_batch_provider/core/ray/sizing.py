"""How many replicas of a model the cluster fits, and whether any node can hold one at all."""

from __future__ import annotations

import ray

from airflow_batch_provider.core.errors import ResourcesUnavailableError
from airflow_batch_provider.core.spec import JobSpec


def replica_count(spec: JobSpec) -> int:
    """Replicas at most: ``spec.num_replicas`` when set, else what the cluster's resources fit."""
    if spec.num_replicas:
        return spec.num_replicas
    total = ray.cluster_resources()
    fits = []
    if spec.num_gpus:
        fits.append(int(total.get("GPU", 0) // spec.num_gpus))
    if spec.num_cpus:
        fits.append(int(total.get("CPU", 0) // spec.num_cpus))
    return max(1, min(fits) if fits else 1)


def check_feasible(spec: JobSpec) -> None:
    """Fail at once when no live node of the cluster has the resources one replica asks for
    (``num_gpus=1`` on a cluster without GPUs): Ray would keep the replica pending forever."""
    wanted = {"CPU": float(spec.num_cpus or 0), "GPU": float(spec.num_gpus or 0)}
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if any(all(res.get(kind, 0.0) >= amount for kind, amount in wanted.items() if amount) for res in nodes):
        return
    have = "; ".join(f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU" for res in nodes) or "no live node"
    raise ResourcesUnavailableError(
        f"no node of the Ray cluster can run a replica of {spec.predictor}: it asks for num_cpus={spec.num_cpus:g}, "
        f"num_gpus={spec.num_gpus:g} on one node, and the live nodes have {have}. Lower num_cpus/num_gpus in the spec, "
        "or add a node with these resources to the cluster."
    )
