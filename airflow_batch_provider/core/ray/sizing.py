"""How many replicas of a model the cluster fits, and whether any node can hold one at all.

Both are counted node by node (:func:`fits`), never from the cluster's totals: Ray places a
replica on one node, so two nodes of 1 GPU hold no replica of ``num_gpus=2``, and one node of
1 GPU holds two of ``num_gpus=0.5``. A replica's shape is everything it asks a node for
(:meth:`~airflow_batch_provider.core.spec.JobSpec.replica_resources`): CPUs, GPUs, memory,
custom resources and the ``accelerator_type:<name>`` resource.
"""

from __future__ import annotations

import math

import ray

from airflow_batch_provider.core.errors import ResourcesUnavailableError
from airflow_batch_provider.core.spec import ACCELERATOR_SLIVER, JobSpec

_ACCELERATOR = "accelerator_type:"

#: Ray counts resources in units of 1/10000: ratios are rounded to as many digits before they
#: are floored (1.0 / 0.1 is 9.999... in floats, and a node of 1 GPU holds 10 replicas of 0.1).
_RAY_RESOURCE_DIGITS = 4


def fits(node_resources: dict[str, float], wanted: dict[str, float]) -> int:
    """Replicas asking ``wanted`` (``{resource: amount}``) that one node with
    ``node_resources`` holds at once (0: none). A replica that asks for nothing counts once."""
    counts = []
    for name, amount in wanted.items():
        if amount <= 0:
            continue
        if name.startswith(_ACCELERATOR):  # a placement label: any number of replicas share it
            counts.append(math.inf if node_resources.get(name, 0.0) >= ACCELERATOR_SLIVER else 0)
            continue
        counts.append(math.floor(round(node_resources.get(name, 0.0) / amount, _RAY_RESOURCE_DIGITS)))
    if not counts or min(counts) == math.inf:
        return 1
    return int(min(counts))


def _live_nodes() -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def replica_count(spec: JobSpec) -> int:
    """Replicas at most: ``spec.num_replicas`` when set, else what the live nodes hold, node by node."""
    if spec.num_replicas:
        return spec.num_replicas
    wanted = spec.replica_resources()
    if not wanted:
        return 1
    return max(1, sum(fits(node, wanted) for node in _live_nodes()))


def check_feasible(spec: JobSpec) -> None:
    """Fail at once when no live node of the cluster has everything one replica asks for
    (``num_gpus=1`` on a cluster without GPUs, ``accelerator_type="H100"`` where no node has
    one): Ray would keep the replica pending forever. The message names the replica's whole
    shape and what each node has of it."""
    wanted = spec.replica_resources()
    nodes = _live_nodes()
    if any(fits(node, wanted) for node in nodes):
        return
    have = "; ".join(_describe_node(node, wanted) for node in nodes) or "no live node"
    raise ResourcesUnavailableError(
        f"no node of the Ray cluster can run a replica of {spec.predictor}: it asks for {describe_shape(spec)} on one node, "
        f"and the live nodes have {have}. Lower what the spec asks for, or add a node with these resources to the cluster."
    )


def describe_shape(spec: JobSpec) -> str:
    """A replica's shape as the spec's fields name it (``num_cpus=1, num_gpus=0.5, accelerator_type='H100'``)."""
    parts = [f"num_cpus={spec.num_cpus:g}", f"num_gpus={spec.num_gpus:g}"]
    if spec.memory:
        parts.append(f"memory={spec.memory} ({spec.memory / 2**30:.1f} GiB)")
    if spec.accelerator_type:
        parts.append(f"accelerator_type={spec.accelerator_type!r}")
    if spec.resources:
        parts.append(f"resources={spec.resources!r}")
    return ", ".join(parts)


def _describe_node(node: dict[str, float], wanted: dict[str, float]) -> str:
    """What one node has of the kinds a replica asks for (CPU and GPU always)."""
    parts = [f"{node.get('CPU', 0):g} CPU", f"{node.get('GPU', 0):g} GPU"]
    for name in wanted:
        if name in ("CPU", "GPU"):
            continue
        if name == "memory":
            parts.append(f"{node.get('memory', 0) / 2**30:.1f} GiB memory")
        elif name.startswith(_ACCELERATOR):
            kinds = sorted(key[len(_ACCELERATOR):] for key in node if key.startswith(_ACCELERATOR))
            parts.append(f"accelerator_type {'/'.join(kinds)}" if kinds else "no accelerator_type")
        else:
            parts.append(f"{node.get(name, 0):g} {name}")
    return ", ".join(parts)
