"""How many replicas of a model the cluster fits, and whether any node can hold one at all.

A replica is one Ray actor, and Ray places an actor on ONE node: what counts is how many
replicas each node holds (``num_gpus=0.5`` puts two on a 1-GPU node; ``num_gpus=2`` does not fit
on two 1-GPU nodes), never the cluster's totals."""

from __future__ import annotations

import ray

from airflow_batch_provider.core.errors import ResourcesUnavailableError
from airflow_batch_provider.core.spec import JobSpec

# Ray counts resources in units of 1/10000 (fractional GPUs, the accelerator sliver): amounts are
# compared with this much slack so that 0.3 + 0.3 + 0.3 + 0.1 still fits on 1 GPU.
_RAY_RESOURCE_UNIT = 1e-4


def fits(node_resources: dict, wanted: dict) -> int:
    """How many replicas asking ``wanted`` (``JobSpec.replica_resources()``) one node with
    ``node_resources`` holds: the smallest ``have // asked`` over the resources asked for; 0 when
    a resource is missing. A replica asking for nothing counts as 1 per node (a bound the caller
    can count with)."""
    counts = []
    for name, asked in wanted.items():
        if asked <= 0:
            continue
        have = float(node_resources.get(name, 0.0))
        counts.append(int((have + _RAY_RESOURCE_UNIT) // asked))
    if not counts:
        return 1
    return max(0, min(counts))


def replica_count(spec: JobSpec) -> int:
    """Replicas at most: ``spec.num_replicas`` when set, else what the cluster's resources fit."""
    if spec.num_replicas:
        return spec.num_replicas
    total = ray.cluster_resources()
    counts = []
    if spec.num_gpus:
        counts.append(int(total.get("GPU", 0) // spec.num_gpus))
    if spec.num_cpus:
        counts.append(int(total.get("CPU", 0) // spec.num_cpus))
    return max(1, min(counts) if counts else 1)


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
