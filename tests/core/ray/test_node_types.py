"""Sizing and feasibility from what the cluster is and can become, decided without Ray: the
live nodes and the autoscaler's node types as ``node_types.read_outlook`` reads them (the
same decisions on Ray's real autoscaler are in ``test_autoscaling.py``)."""

from __future__ import annotations

import pytest

from airflow_batch_provider.core.errors import ResourcesUnavailableError
from airflow_batch_provider.core.ray.node_types import ClusterOutlook, NodeType, describe_resources
from airflow_batch_provider.core.ray.sizing import check_feasible, fits, replica_count
from airflow_batch_provider.core.spec import JobSpec

HEAD = {"CPU": 2.0, "memory": 8e9, "node:__internal_head__": 1.0}
GPU_NODE = {"CPU": 4.0, "GPU": 1.0, "accelerator_type:L4": 1.0}


def spec(**fields) -> JobSpec:
    return JobSpec(source="/in", source_format="jsonl", sink="/out", predictor="m:P", **fields)


def test_fits_counts_one_node():
    assert fits(GPU_NODE, {"CPU": 1, "GPU": 0.5}) == 2  # two replicas per GPU
    assert fits(GPU_NODE, {"CPU": 1, "GPU": 2}) == 0  # never spans two 1-GPU nodes
    assert fits({"GPU": 1.0}, {"GPU": 0.3}) == 3
    assert fits(GPU_NODE, {"CPU": 1, "accelerator_type:H100": 0.001}) == 0
    assert fits(GPU_NODE, {"CPU": 1, "accelerator_type:L4": 0.001}) == 4  # its CPUs bound it
    assert fits(HEAD, {}) == 1


def test_fixed_cluster_without_a_fitting_node_fails_naming_what_it_has():
    outlook = ClusterOutlook(live=(HEAD, {"CPU": 1.0}))
    with pytest.raises(ResourcesUnavailableError) as err:
        check_feasible(spec(num_gpus=1, num_cpus=1), outlook)
    assert "num_gpus=1" in str(err.value) and "2 CPU, 0 GPU; 1 CPU, 0 GPU" in str(err.value) and "no autoscaler" in str(err.value)


def test_published_node_types_decide_at_once():
    outlook = ClusterOutlook(live=(HEAD,), autoscaler="v2", node_types=(NodeType("gpu-l4", GPU_NODE, 8),))
    assert check_feasible(spec(num_gpus=1, num_cpus=1), outlook) is outlook  # a node type holds it: wait for the autoscaler
    with pytest.raises(ResourcesUnavailableError) as err:
        check_feasible(spec(num_gpus=2, num_cpus=1), outlook)
    assert "gpu-l4 (4 CPU, 1 GPU, accelerator_type:L4, at most 8)" in str(err.value)
    assert replica_count(spec(num_gpus=0.5, num_cpus=1), outlook) == 16  # the cluster at its largest
    assert replica_count(spec(num_gpus=1, num_cpus=1, num_replicas=3), outlook) == 3


def test_autoscaler_verdict_without_published_node_types():
    waiting = ClusterOutlook(live=(HEAD,), autoscaler="v1")
    assert check_feasible(spec(num_gpus=4, num_cpus=1), waiting) is waiting  # v1 says nothing: wait, up to node_wait_timeout_s
    refused = ClusterOutlook(live=(HEAD,), autoscaler="v2", infeasible=({"CPU": 1.0, "GPU": 4.0},),
                             seen_types={"gpu": {"CPU": 1.0, "GPU": 1.0}})
    with pytest.raises(ResourcesUnavailableError) as err:
        check_feasible(spec(num_gpus=4, num_cpus=1), refused)
    assert "no node type can hold one" in str(err.value) and "gpu (1 CPU, 1 GPU)" in str(err.value)
    assert check_feasible(spec(num_gpus=1, num_cpus=1), refused) is refused  # another request than the refused one


def test_replica_count_counts_nodes_not_totals():
    one_of_eight_up = ClusterOutlook(live=(HEAD, GPU_NODE))
    assert replica_count(spec(num_gpus=1, num_cpus=1), one_of_eight_up) == 1
    assert replica_count(spec(num_gpus=1, num_cpus=1), ClusterOutlook(live=(HEAD, GPU_NODE, GPU_NODE))) == 2
    assert replica_count(spec(num_gpus=2, num_cpus=1), ClusterOutlook(live=(HEAD, GPU_NODE, GPU_NODE))) == 1  # at least 1


def test_describe_resources_names_what_a_replica_asks():
    assert describe_resources({"CPU": 1.0, "GPU": 1.0, "memory": 2 * (1 << 30), "object_store_memory": 1e8}) == "1 CPU, 1 GPU, 2 GiB memory"
    assert describe_resources(HEAD, only={"GPU": 1.0}) == "2 CPU, 0 GPU"
