"""Questions for Ray's GCS that a Ray Client process cannot ask itself.

A process connected through Ray Client (``ray://``) has no GCS client of its own: Ray's state
tables (actors by state) and the autoscaler's state are out of its reach. Such a question is
asked by a task on the cluster instead (no CPU asked, so it runs even while the replicas hold
every CPU), and answered as it would be inside the cluster; a process connected by the GCS
address asks directly.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import ray

from airflow_batch_provider.core.ray import connection
from airflow_batch_provider.core.tunables import REPLY_S

T = TypeVar("T")

_remote: dict[Callable[..., Any], Any] = {}


def ask(question: Callable[..., T], *args: Any) -> T:
    """``question(*args)``, run where Ray's GCS can be read: in this process, or (through Ray
    Client) as a task on the cluster, which must import ``question``'s module (the provider is
    installed on the cluster's nodes anyway: the replicas are its actors)."""
    if not connection.through_ray_client():
        return question(*args)
    remote = _remote.get(question)
    if remote is None:  # made on first use: a remote function registers with the cluster connected to
        remote = _remote[question] = ray.remote(num_cpus=0, max_retries=0)(question)
    return ray.get(remote.remote(*args), timeout=REPLY_S)
