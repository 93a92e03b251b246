"""How many replicas of a model the cluster fits, and whether any node can hold one at all.

A replica is one Ray actor, and Ray places an actor on ONE node: what counts is how many
replicas each node holds (``num_gpus=0.5`` puts two on a 1-GPU node; ``num_gpus=2`` does not fit
on two 1-GPU nodes), never the cluster's totals."""

from __future__ import annotations

from airflow_batch_provider.core.errors import ResourcesUnavailableError
from airflow_batch_provider.core.ray.node_types import ClusterOutlook, describe_resources, live_nodes, read_outlook
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
    have = "; ".join(describe_resources(node, only=wanted) for node in outlook.live) or "no live node"
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
    fields = [f"num_cpus={spec.num_cpus or 0:g}", f"num_gpus={spec.num_gpus or 0:g}"]
    fields += [f"{name}={getattr(spec, name)!r}" for name in ("memory", "accelerator_type", "resources") if getattr(spec, name)]
    return f"{', '.join(fields)} ({describe_resources(wanted)})"
