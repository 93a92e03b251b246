"""Connecting this process to a Ray cluster, with Ray 2.60's token auth.

Ray is imported when a process connects, not when this module loads: Airflow's scheduler,
DAG processor, triggerer and Celery workers import the provider (plugins, links, DAG files)
and fork task processes, and a task forked from a process with Ray's core library loaded
could be aborted by Ray inside ``ray.init`` (a C++ check, not an exception).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from airflow_batch_provider.core import failpoints
from airflow_batch_provider.core.errors import RayWorkError
from airflow_batch_provider.core.tunables import CONNECT_FIRST_PAUSE_S, CONNECT_MAX_PAUSE_S, DEFAULTS

log = logging.getLogger(__name__)

NAMESPACE = "airflow_batch_provider"


@dataclass(frozen=True)
class RayTarget:
    """How to reach Ray: address (None: RAY_ADDRESS or a local Ray) and auth token."""

    address: str | None = None
    token: str | None = field(default=None, repr=False)


def connect(target: RayTarget | None = None, *, timeout_s: float = DEFAULTS.connect_timeout_s) -> None:
    """``ray.init`` once per process; later calls reuse the connection.

    A connection that fails with an error of Ray's (the cluster restarting, a node's raylet
    not answering yet, a dropped socket) is tried again, with a growing pause, until
    ``timeout_s`` has passed: a task whose cluster hiccups connects within its try instead
    of failing it. Errors in what the caller asked for (``ValueError``, ``TypeError``: a
    malformed address) fail at once."""
    import ray

    if ray.is_initialized():
        return
    target = target or RayTarget()
    where = target.address or os.environ.get("RAY_ADDRESS") or "a new local Ray"
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "logging_level": logging.WARNING, "log_to_driver": True}
    if target.address:
        kwargs["address"] = target.address
    deadline = time.monotonic() + timeout_s
    pause = CONNECT_FIRST_PAUSE_S
    try:
        for attempt in itertools.count(1):
            if target.token:
                _use_token(target.token)
            try:
                failpoints.hit("ray_connect")
                ray.init(**kwargs)
                break
            except (ValueError, TypeError):
                raise
            except Exception as err:
                if ray.is_initialized():
                    ray.shutdown()
                if time.monotonic() + pause > deadline:
                    raise RayWorkError(
                        f"cannot connect to Ray at {where} ({attempt} attempts in {timeout_s:.0f} s; last: "
                        f"{type(err).__name__}: {err}); check that the cluster is up and reachable from this worker"
                    ) from err
                log.warning("Could not connect to Ray at %s (attempt %s: %s: %s); trying again in %.0f s",
                            where, attempt, type(err).__name__, err, pause)
                time.sleep(pause)
                pause = min(pause * 2, CONNECT_MAX_PAUSE_S)
    finally:
        if target.token:
            # Ray's client keeps the token it read; it must not stay in this process's
            # environment, where every subprocess (and anything that dumps os.environ) sees it.
            os.environ.pop("RAY_AUTH_TOKEN", None)
    log.info("Connected to Ray at %s", where)


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
