"""Connecting this process to a Ray cluster, with Ray 2.60's token auth, and again when the
connection is lost.

Two kinds of address work: the GCS address (``head:6379``), which makes this process a Ray
driver of its own (it must reach every node), and a Ray Client address (``ray://head:10001``),
the usual route from an Airflow worker outside the cluster's network (one port, the head's
client server, which runs the driver inside the cluster). Ray Client takes a dropped
connection up again by itself for ``RAY_CLIENT_RECONNECT_GRACE_PERIOD`` seconds (30 by
default); past that its calls raise ``ConnectionError`` and the process is disconnected:
:func:`reconnect` connects again, and the caller follows its call again by its work id (the
references of the lost session are gone with it).

Ray is imported when a process connects, not when this module loads: Airflow's scheduler,
DAG processor, triggerer and Celery workers import the provider (plugins, links, DAG files)
and fork task processes, and a task forked from a process with Ray's core library loaded
could be aborted by Ray inside ``ray.init`` (a C++ check, not an exception).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from airflow_batch_provider.core import failpoints
from airflow_batch_provider.core.errors import RayWorkError
from airflow_batch_provider.core.tunables import CLIENT_PROBE_S, CONNECT_FIRST_PAUSE_S, CONNECT_MAX_PAUSE_S, DEFAULTS

log = logging.getLogger(__name__)

NAMESPACE = "airflow_batch_provider"
RAY_CLIENT_SCHEME = "ray://"
#: the Ray Client server's port when a ``ray://`` address names none (Ray's default).
RAY_CLIENT_DEFAULT_PORT = 10001

#: what this process connected to last, and with how much patience (:func:`reconnect` uses
#: them again); ``_session`` counts connections, so that threads that lost the same one
#: reconnect once.
_lock = threading.Lock()
_last: tuple[RayTarget, float] | None = None
_session = 0


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

    global _last, _session

    if ray.is_initialized():
        return
    if _last is not None and _is_client(_last[0]):
        ray.shutdown()  # a lost Ray Client's context lingers, and ray.init refuses to connect beside it
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
                if _is_client(target):
                    _probe_client_server(target.address or os.environ["RAY_ADDRESS"])
                ray.init(**kwargs)
                break
            except (ValueError, TypeError):
                raise
            except Exception as err:
                ray.shutdown()  # also what a failed Ray Client connection left behind
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
    _last, _session = (target, timeout_s), _session + 1
    if _is_client(target):
        _no_auto_init()
    log.info("Connected to Ray at %s", where)


def session() -> int:
    """Which connection of this process is the current one (1: the first)."""
    return _session


def connected_address() -> str | None:
    """The address this process last connected to as its caller named it (``ray://...``
    included), or None (``RAY_ADDRESS``, or a local Ray)."""
    return _last[0].address if _last else None


def through_ray_client() -> bool:
    """Whether this process is connected to Ray through Ray Client (``ray://``)."""
    return _last is not None and _is_client(_last[0])


def is_lost_connection(err: BaseException) -> bool:
    """Whether ``err`` says this process's Ray Client connection is gone for good: Ray Client
    raises ``ConnectionError`` once it could not reconnect within its grace period, and then
    disconnects the process (any Ray call after that fails: Ray is not initialized). Errors
    of the work itself come as Ray's own exception types (a predictor's ``ConnectionError``
    too), never as these. A GCS-address connection is never "lost" here: a driver that loses
    its cluster is ended by Ray."""
    if _last is None or not _is_client(_last[0]) or not isinstance(err, Exception):
        return False
    import ray

    if not ray.is_initialized():
        return True
    return isinstance(err, ConnectionError) and not isinstance(err, ray.exceptions.RayError)


def _probe_client_server(address: str) -> None:
    """Raise ``OSError`` unless the Ray Client server at ``address`` accepts a TCP connection.

    Asked before ``ray.init``: when Ray Client's own connect fails (a server not listening yet,
    the head restarting), Ray 2.60 can hang for good while it closes that failed connection
    (its log stream's thread is joined and never ends), so a server that is not there is found
    out here and tried again like any failed attempt."""
    import socket

    host, _, port = address[len(RAY_CLIENT_SCHEME):].partition("/")[0].rpartition(":")
    if not host:
        host, port = port, str(RAY_CLIENT_DEFAULT_PORT)
    with socket.create_connection((host.strip("[]"), int(port)), timeout=CLIENT_PROBE_S):
        pass


def _is_client(target: RayTarget) -> bool:
    return (target.address or os.environ.get("RAY_ADDRESS") or "").startswith(RAY_CLIENT_SCHEME)


def _no_auto_init() -> None:
    """Stop Ray from starting a Ray of its own in this process when a Ray call finds it not
    connected (Ray's auto-init): a Ray Client whose connection is lost is disconnected, and
    the next call (a status question) would otherwise start a local Ray, find no replica
    there and take the call for lost. Without auto-init that call raises, and the caller
    connects again (:func:`reconnect`)."""
    try:
        from ray._private import auto_init_hook
    except ImportError:  # a Ray without it starts nothing by itself
        return
    auto_init_hook.enable_auto_connect = False


def reconnect(lost_session: int, err: BaseException | None = None) -> None:
    """Connect again to what this process connected to, within the time :func:`connect` was
    given, after ``lost_session`` was lost (``err``). Threads that lost the same session
    connect once: a thread that comes second finds the new session and returns."""
    import ray

    with _lock:
        if _session != lost_session and ray.is_initialized():
            return
        if _last is None:
            raise RuntimeError("reconnect() before connect(): nothing to connect to again")
        target, timeout_s = _last
        log.warning("The connection to Ray at %s was lost (%s: %s); connecting again (up to %.0f s)",
                    target.address or os.environ.get("RAY_ADDRESS"), type(err).__name__ if err else "-", err, timeout_s)
        # Unconditionally: a lost Ray Client is no longer "initialized" but still holds its
        # context, and ray.init refuses to connect beside it until it is shut down.
        ray.shutdown()
        connect(target, timeout_s=timeout_s)


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
