"""What the Ray cluster can BECOME, as Ray publishes it: is an autoscaler there, which node
types can it launch, which requests has it found no node type for.

On KubeRay, the cluster launcher or Anyscale a GPU worker group often sits at 0 nodes until
work asks for it, so the live nodes alone cannot say whether a replica will ever be placed.
Ray publishes three things about the autoscaler in its GCS (checked on Ray 2.60):

- the cluster config (``ray._private.state.state.get_cluster_config()``: node types with their
  resources and min/max counts), where the deployment reports it (Anyscale does; neither
  Ray's v1 nor its v2 autoscaler reports it on an open-source cluster: it answers None there);
- autoscaler v2 (KubeRay's; ``RAY_enable_autoscaler_v2=1``): its state, through the GCS's
  ``GetClusterStatus``, with the resource requests it found *no node type* can hold
  (``infeasible_resource_requests``) and its pending launches;
- autoscaler v1 (the cluster launcher's default): the ``__autoscaling_status`` entry of the
  GCS key-value store, which says it runs (and its pending launches) but neither its node
  types' resources nor its verdicts. Every ``ray start``/``ray.init`` cluster runs this
  monitor too, with Ray's read-only provider, whose node types are its live nodes
  (``node_<node id>``): such a cluster is a fixed one.

So: node types when published; else the v2 autoscaler's verdict on our replica's request
(known once the replica asked, one autoscaler round later); else, under v1, a wait up to the
deadline the deployment sets (``node_wait_timeout_s``). No autoscaler at all: a fixed cluster,
decided from the live nodes alone. Nothing here reads a cluster YAML from disk.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field

import ray

log = logging.getLogger(__name__)

#: the node type the v1 monitor gives each live node of a fixed cluster (Ray's read-only
#: provider, which ``ray start`` and ``ray.init`` run): ``node_<node id>``.
_MIRRORED_TYPE = re.compile(r"node_[0-9a-f]{56}")
#: how long one question to the GCS about the autoscaler may take (it answers from memory).
_GCS_QUESTION_S = 10


@dataclass(frozen=True)
class NodeType:
    """One kind of node the autoscaler can launch: its resources and how many at most (-1: no limit)."""

    name: str
    resources: dict[str, float]
    max_count: int = -1

    def describe(self) -> str:
        return f"{self.name} ({describe_resources(self.resources)}, at most {'any' if self.max_count < 0 else self.max_count})"


@dataclass(frozen=True)
class ClusterOutlook:
    """The cluster now and what it can become.

    ``autoscaler``: "v2", "v1" or None (a fixed cluster). ``node_types``: the node types, when
    the cluster publishes them (else empty). ``infeasible``: request shapes the v2 autoscaler
    found no node type for. ``pending_launches``: nodes being launched now."""

    live: tuple[dict[str, float], ...] = ()
    autoscaler: str | None = None
    node_types: tuple[NodeType, ...] = ()
    infeasible: tuple[dict[str, float], ...] = ()
    pending_launches: int = 0
    seen_types: dict[str, dict[str, float]] = field(default_factory=dict)

    def says_infeasible(self, wanted: dict[str, float]) -> bool:
        """Whether the autoscaler reported ``wanted`` (a replica's request) as one no node type holds."""
        return any(_same_request(shape, wanted) for shape in self.infeasible)

    def describe_types(self) -> str:
        """The node types for a message: as published, else those seen on live nodes (by the
        v2 autoscaler's type names)."""
        if self.node_types:
            return "; ".join(t.describe() for t in self.node_types)
        if self.seen_types:
            return "; ".join(f"{name} ({describe_resources(res) if res else 'its resources unknown while none is up'})"
                             for name, res in sorted(self.seen_types.items())) + \
                " (the node types of nodes seen in this cluster; it does not publish its autoscaler's node types)"
        return "none published (this cluster does not publish its autoscaler's node types)"


def describe_resources(resources: dict[str, float], only: dict[str, float] | None = None) -> str:
    """``1 CPU, 1 GPU, 8 GiB memory, accelerator_type:H100`` (object store and node ids left
    out); with ``only``, just the resources it names (0 where ``resources`` has none)."""
    parts = []
    names = ["CPU", "GPU", *only] if only is not None else resources
    for name in sorted(dict.fromkeys(names), key=lambda n: (n not in ("CPU", "GPU", "memory"), n)):
        amount = resources.get(name, 0.0)
        if only is not None and amount == 0 and name.startswith("accelerator_type:"):
            parts.append(f"no {name}")
            continue
        if name == "object_store_memory" or name.startswith("node:"):
            continue
        if name == "memory":
            parts.append(f"{amount / (1 << 30):.3g} GiB memory")
        elif name.startswith("accelerator_type:"):
            parts.append(name)
        else:
            parts.append(f"{amount:g} {name}")
    return ", ".join(parts) or "no resources"


def live_nodes() -> list[dict[str, float]]:
    """Total resources of every live node."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def read_outlook() -> ClusterOutlook:
    """What Ray publishes now (each source that does not answer is left out: a question about
    the autoscaler never fails the caller; a fixed cluster is the answer when none does).

    Through Ray Client (``ray://``) it is read by a task on the cluster
    (:mod:`~airflow_batch_provider.core.ray.on_cluster`): an Airflow worker outside a KubeRay
    cluster sees its GPU group that scales from zero as a worker inside does."""
    from airflow_batch_provider.core.ray import on_cluster

    try:
        return on_cluster.ask(read_outlook_here)
    except Exception as err:  # as any source that does not answer: what this process sees
        log.warning("Could not read the autoscaler's state on the Ray cluster (%s: %s); deciding from the live nodes",
                    type(err).__name__, err)
        return read_outlook_here()


def read_outlook_here() -> ClusterOutlook:
    """:func:`read_outlook` from this process's own connection to the GCS."""
    live = tuple(live_nodes())
    node_types = tuple(_published_node_types())
    v2 = _autoscaler_v2_state()
    if v2 is not None:
        infeasible, pending, seen = v2
        return ClusterOutlook(live, "v2", node_types, infeasible, pending, seen)
    v1 = _autoscaler_v1_status()
    if v1 is not None:
        return ClusterOutlook(live, "v1", node_types, (), v1)
    return ClusterOutlook(live, "v1" if node_types else None, node_types)


def _published_node_types() -> list[NodeType]:
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as err:  # an older Ray, or a Ray Client connection: not published
        log.debug("No cluster config from Ray: %s", err)
        return []
    if config is None:
        return []
    return [NodeType(group.name, {k: float(v) for k, v in group.resources.items()}, int(group.max_count))
            for group in config.node_group_configs if group.max_count != 0]


def _gcs_client():
    from ray._private import worker

    return worker.global_worker.gcs_client


def _autoscaler_v2_state() -> tuple[tuple[dict[str, float], ...], int, dict[str, dict[str, float]]] | None:
    """(infeasible request shapes, pending launches, node types seen on live nodes) from the v2
    autoscaler, or None when it does not run."""
    try:
        gcs = _gcs_client()
        enabled = gcs.internal_kv_get(ray._raylet.GCS_AUTOSCALER_V2_ENABLED_KEY.encode(),
                                      namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode(), timeout=_GCS_QUESTION_S)
        if enabled != b"1":
            return None
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        reply = GetClusterStatusReply()
        reply.ParseFromString(gcs.get_cluster_status(timeout_s=_GCS_QUESTION_S))
    except Exception as err:
        log.debug("No autoscaler v2 state from Ray: %s", err)
        return None
    scaling = reply.autoscaling_state
    infeasible = tuple(dict(request.resources_bundle) for request in scaling.infeasible_resource_requests)
    pending = sum(request.count for request in scaling.pending_instance_requests) + len(scaling.pending_instances)
    seen: dict[str, dict[str, float]] = {}
    for node in reply.cluster_resource_state.node_states:
        name = node.ray_node_type_name
        if name and not _MIRRORED_TYPE.fullmatch(name) and "node:__internal_head__" not in node.total_resources:
            if node.total_resources or name not in seen:  # a removed node keeps its type's name, not its resources
                seen[name] = dict(node.total_resources)
    return infeasible, pending, seen


def _autoscaler_v1_status() -> int | None:
    """Pending launches of the v1 autoscaler, or None when it does not run."""
    try:
        raw = _gcs_client().internal_kv_get(b"__autoscaling_status", namespace=None, timeout=_GCS_QUESTION_S)
        if not raw:
            return None
        report = json.loads(raw).get("autoscaler_report") or {}
    except Exception as err:
        log.debug("No autoscaler v1 status from Ray: %s", err)
        return None
    types = set((report.get("node_type_mapping") or {}).values()) | set(report.get("active_nodes") or {})
    if all(_MIRRORED_TYPE.fullmatch(name) for name in types):
        return None  # Ray's read-only provider: a fixed cluster, each live node mirrored as a type of its own
    return sum((report.get("pending_launches") or {}).values()) + len(report.get("pending_nodes") or [])


def _same_request(shape: dict[str, float], wanted: dict[str, float]) -> bool:
    keys = {k for k, v in shape.items() if v > 0} | {k for k, v in wanted.items() if v > 0}
    return all(abs(shape.get(k, 0.0) - wanted.get(k, 0.0)) < 1e-4 for k in keys)
