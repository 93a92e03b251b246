"""Airflow connection of type ``ray_batch``: where the Ray cluster is and how to authenticate.

(Formerly type ``ray``, id ``ray_default``: still read, with a DeprecationWarning; see
``hooks/ray_connection.py``.)"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException

from airflow_batch_provider.core.api import RayTarget, connect
from airflow_batch_provider.hooks import ray_connection
from airflow_batch_provider.settings import tunables


class RayHook(BaseHook):
    """Connects this process to Ray, once.

    Connection fields: ``host`` is the Ray address (``10.0.0.5:6379``, ``ray://head:10001``
    or ``auto``), ``port`` is appended when the host has none, ``password`` is the Ray auth
    token (Ray 2.60 ``ray start --head`` turns token auth on). When the connection does not
    exist, Ray's own environment applies (``RAY_ADDRESS``, ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_MODE``); with none of those either, a local Ray is started in this process.

    Which address: the GCS address (``head:6379``) when the Airflow workers and triggerer run
    in the cluster's network (every Ray node must be reachable from them, and they from every
    node); a Ray Client address (``ray://head:10001``, the head's
    ``--ray-client-server-port``; on KubeRay the head service's ``client`` port) when they
    run outside it: only that one port must be reachable. Both carry the token, and both run
    everything the provider does (replicas, secrets, leases, deferred shard tasks followed by
    the triggerer); Ray Client must run the cluster's Ray and Python versions. Through Ray
    Client, a dropped connection is taken up again by Ray for
    ``RAY_CLIENT_RECONNECT_GRACE_PERIOD`` seconds (30 by default, set in the worker's
    environment); past that the shard task connects again (within ``connect_timeout_s``) and
    follows its call, which ran on, by its work id, in the same try. Ray Client adds a hop per
    call: a shard's data never passes through it (replicas read and write the storage
    themselves), only calls and their small replies do.

    The connection's extra may hold ``{"runtime_env": {...}}`` (Ray's dict: ``working_dir``,
    ``py_modules``, ``pip``, ``env_vars``): the replicas' runtime_env for every spec run on
    this connection that sets none of its own (:meth:`get_runtime_env`). It is how code reaches
    a cluster whose nodes do not have it installed, set once per cluster rather than per DAG.
    Ray shows a replica's runtime_env in its dashboard and state API: keep secrets out of its
    ``env_vars`` (``predictor_secrets`` is for them); logs name only its keys.

    The connection type is ``ray_batch`` (default id ``ray_batch_default``), not ``ray``:
    apache-airflow-providers-ray registers ``ray`` for its own, different connection. A
    connection of type ``ray`` written for this provider is still read, and so is
    ``ray_default`` when no ``ray_batch_default`` exists (and the other way round, for DAGs and
    deferred triggers that name ``ray_default``), each with a DeprecationWarning (also
    logged) saying how to move; one of that provider (a dashboard URL in its extra) is refused,
    naming it. After such a fallback ``ray_conn_id`` names the connection actually read.

    :param ray_conn_id: the ``ray_batch`` connection to use.
    """

    conn_name_attr = "ray_conn_id"
    default_conn_name = ray_connection.DEFAULT_CONN_ID
    conn_type = ray_connection.CONN_TYPE
    hook_name = "Ray (batch inference)"

    def __init__(self, ray_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ray_conn_id = ray_conn_id

    def get_target(self) -> RayTarget:
        conn = self._connection()
        return self._no_connection() if conn is None else self._target_from(conn)

    async def aget_target(self) -> RayTarget:
        """:meth:`get_target` for triggers: reads the connection without blocking the event loop."""
        conn = await self._aconnection()
        return self._no_connection() if conn is None else self._target_from(conn)

    def _connection(self) -> Any | None:
        """The connection to read (None: none exists), old names included (see the class doc)."""
        try:
            return ray_connection.checked(self.ray_conn_id, self.get_connection(self.ray_conn_id), self.log)
        except AirflowNotFoundException:
            other = ray_connection.STAND_INS.get(self.ray_conn_id)
        if other is None:
            return None
        try:
            return self._stand_in(other, self.get_connection(other))
        except AirflowNotFoundException:
            return None

    async def _aconnection(self) -> Any | None:
        """:meth:`_connection` through the async lookup (triggers)."""
        try:
            return ray_connection.checked(self.ray_conn_id, await self.aget_connection(self.ray_conn_id), self.log)
        except AirflowNotFoundException:
            other = ray_connection.STAND_INS.get(self.ray_conn_id)
        if other is None:
            return None
        try:
            return self._stand_in(other, await self.aget_connection(other))
        except AirflowNotFoundException:
            return None

    def _stand_in(self, conn_id: str, conn: Any) -> Any | None:
        read = ray_connection.stand_in(self.ray_conn_id, conn_id, conn, self.log)
        if read is not None:
            self.ray_conn_id = conn_id  # messages name what was read
        return read

    def _no_connection(self) -> RayTarget:
        # Both lookups raise the task SDK's AirflowNotFoundException for a missing connection
        # (Connection.get / async_get turn the supervisor's CONNECTION_NOT_FOUND into it);
        # any other error (backend unreachable, access denied) propagates.
        self.log.info("No %r connection: using RAY_ADDRESS / RAY_AUTH_TOKEN or a local Ray", self.ray_conn_id)
        return RayTarget()

    @staticmethod
    def _target_from(conn: Any) -> RayTarget:
        address = conn.host or None
        if address and conn.port and ":" not in address.split("://")[-1]:
            address = f"{address}:{conn.port}"
        return RayTarget(address=address, token=conn.password or None)

    def get_runtime_env(self) -> dict[str, Any] | None:
        """The ``runtime_env`` of the connection's extra (None when the connection or the key is
        absent); a value that is not a JSON object is refused, naming the connection."""
        conn = self._connection()
        if conn is None:
            return None
        env = conn.extra_dejson.get("runtime_env") if conn.extra else None
        if env is not None and not isinstance(env, dict):
            raise ValueError(f"the extra of the {self.ray_conn_id!r} connection holds runtime_env={type(env).__name__}: it must be a "
                             "JSON object as Ray takes it, e.g. {\"runtime_env\": {\"working_dir\": \"s3://bucket/code.zip\"}}")
        return env or None

    def get_conn(self) -> RayTarget:
        target = self.get_target()
        connect(target, timeout_s=tunables().connect_timeout_s)
        return target
