"""How many replicas of a model the cluster fits, and whether any node can hold one at all.

Both are counted node by node (:func:`fits`), never from the cluster's totals: Ray places a
replica (one actor) on ONE node, so two nodes of 1 GPU hold no replica of ``num_gpus=2``, and
one node of 1 GPU holds two of ``num_gpus=0.5``. A replica's shape is everything it asks a node
for (:meth:`~airflow_batch_provider.core.spec.JobSpec.replica_resources`): CPUs, GPUs, memory,
custom resources and the ``accelerator_type:<name>`` resource. On an autoscaling cluster,
"whether any node can hold one" includes the nodes its autoscaler can launch
(:mod:`~airflow_batch_provider.core.ray.node_types`).
"""

from __future__ import annotations

import math

from airflow_batch_provider.core.errors import ResourcesUnavailableError
from airflow_batch_provider.core.ray.node_types import ClusterOutlook, describe_resources, live_nodes, read_outlook
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


def fits_now(spec: JobSpec, nodes: list[dict] | None = None) -> int:
    """Replicas the live nodes hold, node by node (their total resources, not what is free)."""
    wanted = spec.replica_resources()
    return sum(fits(node, wanted) for node in (live_nodes() if nodes is None else nodes))


def replica_count(spec: JobSpec, outlook: ClusterOutlook | None = None) -> int:
    """Replicas at most: ``spec.num_replicas`` when set; else what the live nodes hold, node by
    node, or what the published node types hold at their ``max_count``, whichever is more (a
    type without a limit counts for none here: growth beyond is one replica per waiting
    caller, see ``leases``). At least 1."""
    if spec.num_replicas:
        return spec.num_replicas
    outlook = outlook or read_outlook()
    wanted = spec.replica_resources()
    live = fits_now(spec, list(outlook.live))
    # A type's max_count counts its live nodes too: the cluster at its largest, or as it is now.
    grown = sum(fits(t.resources, wanted) * t.max_count for t in outlook.node_types if t.max_count > 0)
    return max(1, live, grown)


def can_grow(outlook: ClusterOutlook) -> bool:
    """Whether an autoscaler may add nodes (else the live nodes are all there is)."""
    return outlook.autoscaler is not None


def check_feasible(spec: JobSpec, outlook: ClusterOutlook | None = None) -> ClusterOutlook:
    """Fail at once when no node can ever hold one replica; returns what it read.

    A live node that holds it, or a node type the autoscaler can launch that holds it: feasible
    (the caller waits for the autoscaler). No autoscaler (a fixed cluster) and no live node
    that holds it, the published node types none that does, or the v2 autoscaler reporting
    the replica's request as one no node type holds: :class:`ResourcesUnavailableError`, naming
    what the replica asks and the nodes and node types there are (Ray would keep the replica
    pending forever)."""
    wanted = spec.replica_resources()
    outlook = outlook or read_outlook()
    if any(fits(node, wanted) for node in outlook.live):
        return outlook
    asks = _asks(spec, wanted)
    have = "; ".join(_describe_node(node, wanted) for node in outlook.live) or "no live node"
    if outlook.autoscaler is None:
        raise ResourcesUnavailableError(
            f"no node of the Ray cluster can run a replica of {spec.predictor}: it asks for {asks} on ONE node, "
            f"and the live nodes have {have} (the cluster has no autoscaler). Lower num_cpus/num_gpus/memory/resources "
            "in the spec, or add a node with these resources to the cluster."
        )
    if outlook.node_types:
        if any(fits(t.resources, wanted) for t in outlook.node_types):
            return outlook
        reason = "no node type of its autoscaler can hold one"
    elif outlook.says_infeasible(wanted):
        reason = "its autoscaler reports that no node type can hold one"
    else:
        return outlook  # the autoscaler decides: wait for it (up to node_wait_timeout_s)
    raise ResourcesUnavailableError(
        f"the Ray cluster can never run a replica of {spec.predictor}: it asks for {asks} on ONE node, and {reason}. "
        f"Node types: {outlook.describe_types()}. Live nodes: {have}. Lower num_cpus/num_gpus/memory/resources/"
        "accelerator_type in the spec, or add a node type with these resources to the cluster's autoscaler."
    )


def _asks(spec: JobSpec, wanted: dict[str, float]) -> str:
    """What a replica asks for, as the spec says it and as Ray counts it."""
    return f"{describe_shape(spec)} ({describe_resources(wanted)})"


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
