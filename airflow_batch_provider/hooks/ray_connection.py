"""The names of this provider's Ray connection, the names it had before, and how old ones are read.

This provider's connection type is ``ray_batch`` (default id ``ray_batch_default``). It used to
be ``ray`` (``ray_default``), which Airflow's own Ray provider (apache-airflow-providers-ray)
registers too, for a different connection: a Ray *dashboard* URL and Kubernetes settings in
its extra, for Ray's job submission API. Airflow keeps one hook per connection type (the first
provider it finds, by package name) and logs the other as a clash, so with both installed one
provider lost its connection form. The old names keep working for now, with a
DeprecationWarning saying how to move; a connection that is really Airflow's Ray provider's is
refused by name, since its dashboard URL is not an address this provider can connect to (the
GCS or Ray Client port differs, and it holds no auth token).

Imports nothing of Airflow at module level: ``get_provider_info`` reads the names while
Airflow is still loading its configuration.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

CONN_TYPE = "ray_batch"
DEFAULT_CONN_ID = "ray_batch_default"
LEGACY_CONN_TYPE = "ray"
LEGACY_DEFAULT_CONN_ID = "ray_default"
#: a default id that does not exist -> the one read in its place: the old default for the new
#: (connections not yet renamed), the new for the old (DAGs and deferred triggers that name it).
STAND_INS = {DEFAULT_CONN_ID: LEGACY_DEFAULT_CONN_ID, LEGACY_DEFAULT_CONN_ID: DEFAULT_CONN_ID}

#: the connection fields (kept in the extra) of apache-airflow-providers-ray's ``ray`` type:
#: its provider info's ``conn-fields``. None of them is this provider's.
AIRFLOW_RAY_PROVIDER_FIELDS = frozenset({
    "address", "cookies", "metadata", "headers", "verify",
    "kube_config_path", "kube_config", "namespace", "cluster_context",
})

MIGRATE = (f"set its connection type to {CONN_TYPE!r} (same fields: host = Ray address, port, password = Ray auth token, "
           f"extra = runtime_env), e.g. \"conn_type\": \"{CONN_TYPE}\" in its AIRFLOW_CONN_... JSON, or `airflow connections delete <id>` "
           f"and `airflow connections add <id> --conn-type {CONN_TYPE}` with the same fields")


def is_airflow_ray_provider_connection(conn: Any) -> bool:
    """Whether ``conn`` is apache-airflow-providers-ray's: type ``ray``, no host (its form hides
    it) and its fields in the extra."""
    if conn.conn_type != LEGACY_CONN_TYPE or conn.host:
        return False
    extra = conn.extra_dejson if conn.extra else {}
    return bool(AIRFLOW_RAY_PROVIDER_FIELDS & set(extra))


def checked(conn_id: str, conn: Any, log: logging.Logger | Any) -> Any:
    """``conn`` (named ``conn_id``) if this provider can read it; a ``ray``-typed one of this
    provider's shape is read with a DeprecationWarning; one of Airflow's Ray provider is refused."""
    if is_airflow_ray_provider_connection(conn):
        from airflow_batch_provider.exceptions import BatchInferenceFailure

        fields = ", ".join(sorted(AIRFLOW_RAY_PROVIDER_FIELDS & set(conn.extra_dejson)))
        raise BatchInferenceFailure(
            f"the {conn_id!r} connection is apache-airflow-providers-ray's (type 'ray' with {fields} in its extra): its dashboard "
            f"URL is not an address batch inference can connect to. Create a {CONN_TYPE!r} connection (host = the GCS address "
            f"head:6379 or the Ray Client address ray://head:10001, password = the Ray auth token) and pass its id as ray_conn_id "
            f"(default {DEFAULT_CONN_ID!r})")
    if conn.conn_type == LEGACY_CONN_TYPE:
        deprecated(f"the {conn_id!r} connection has type {LEGACY_CONN_TYPE!r}, which apache-airflow-providers-ray registers too "
                   f"for another kind of connection; it is read as {CONN_TYPE!r} for now: {MIGRATE}", log)
    return conn


def stand_in(asked: str, conn_id: str, conn: Any, log: logging.Logger | Any) -> Any | None:
    """``conn`` (``conn_id``), read in place of ``asked``, which does not exist (one of
    :data:`STAND_INS`), with a DeprecationWarning; None when it is Airflow's Ray provider's
    ``ray_default``, which is not ours to read."""
    if is_airflow_ray_provider_connection(conn):
        log.info("No %r connection; %r is apache-airflow-providers-ray's (a dashboard URL), not read", asked, conn_id)
        return None
    if asked == DEFAULT_CONN_ID:
        retype = f"; and {MIGRATE}" if conn.conn_type == LEGACY_CONN_TYPE else ""
        deprecated(f"no {DEFAULT_CONN_ID!r} connection: the {LEGACY_DEFAULT_CONN_ID!r} connection is read instead, for now. Rename "
                   f"it to {DEFAULT_CONN_ID!r} (AIRFLOW_CONN_RAY_BATCH_DEFAULT in the environment){retype}", log)
        return conn
    deprecated(f"ray_conn_id={LEGACY_DEFAULT_CONN_ID!r} names no connection: the {DEFAULT_CONN_ID!r} connection is read instead, "
               f"for now. Pass ray_conn_id={DEFAULT_CONN_ID!r} (the default) or leave it out", log)
    return checked(conn_id, conn, log)


def deprecated(message: str, log: logging.Logger | Any) -> None:
    """A DeprecationWarning (for tests and ``-W error``) and the same words in the task's log,
    where Python's default filters would hide the warning."""
    warnings.warn(message, DeprecationWarning, stacklevel=3)
    log.warning("Deprecated: %s", message)
