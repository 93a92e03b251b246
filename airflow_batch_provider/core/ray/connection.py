"""Connecting this process to a Ray cluster, with Ray 2.60's token auth."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import ray

log = logging.getLogger(__name__)

NAMESPACE = "airflow_batch_provider"


@dataclass(frozen=True)
class RayTarget:
    """How to reach Ray: address (None: RAY_ADDRESS or a local Ray) and auth token."""

    address: str | None = None
    token: str | None = field(default=None, repr=False)


def connect(target: RayTarget | None = None) -> None:
    """``ray.init`` once per process; later calls reuse the connection."""
    if ray.is_initialized():
        return
    target = target or RayTarget()
    if target.token:
        _use_token(target.token)
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "logging_level": logging.WARNING, "log_to_driver": True}
    if target.address:
        kwargs["address"] = target.address
    try:
        ray.init(**kwargs)
    finally:
        if target.token:
            # Ray's client keeps the token it read; it must not stay in this process's
            # environment, where every subprocess (and anything that dumps os.environ) sees it.
            os.environ.pop("RAY_AUTH_TOKEN", None)
    log.info("Connected to Ray at %s", target.address or os.environ.get("RAY_ADDRESS") or "a new local Ray")


def _use_token(token: str) -> None:
    """Make this process's Ray client send ``token``.

    Setting ``RAY_AUTH_TOKEN`` is not enough once Ray is imported: the client sends a token
    only in token mode (``RAY_AUTH_MODE=token``), and Ray caches both the mode and the token
    (else read from ``~/.ray/auth_token``, possibly another cluster's) in C++, so both
    caches are refreshed here.
    """
    os.environ["RAY_AUTH_TOKEN"] = token  # read by Ray's client while it connects, then removed
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token auth: the environment is all there is
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
