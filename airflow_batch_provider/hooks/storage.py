"""Credentials for S3 sources and sinks, from the amazon provider's ``aws`` connection.

The connection (``aws_default``, ``storage_conn_id`` or the ``s3://conn_id@bucket/...`` form)
is read by the amazon provider's ``AwsBaseHook``, so it means what it means to every other
user of ``aws_default``: access key and secret, ``aws_session_token``, ``role_arn``
(assume-role), ``profile_name``, ``endpoint_url`` (or ``service_config.s3.endpoint_url``) and
``region_name``. The resolved credentials are handed to fsspec/boto3 as s3fs-style storage
options and to the model replicas as call arguments; they are never logged, pushed to XCom or
put into templated fields (the spec only names the connection).

:func:`storage_options_at` is the one rule every reader of a sink resolves credentials by:
the tasks and the status page (through :func:`storage_options_for`, from the spec) and the
``airflow-batch`` CLI (from ``SINK``, ``--checkpoint-dir`` and ``--conn-id``), so the same
locations and connection give the same options wherever they are read.

Needs the ``s3`` extra: ``pip install 'airflow-batch-provider[s3]'``. Airflow itself is
imported only when a connection is read: the CLI on a local sink never loads it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from airflow_batch_provider.core.api import is_remote
from airflow_batch_provider.spec import BatchSpec

DEFAULT_AWS_CONN_ID = "aws_default"

log = logging.getLogger(__name__)


def storage_options_for(spec: BatchSpec) -> dict[str, Any] | None:
    """Storage options for the spec's URLs (source, sink, checkpoint) and its ``storage_conn_id``."""
    return storage_options_at((spec.source, spec.sink_root, spec.checkpoint_root), spec.storage_conn_id)


def storage_options_at(locations: Iterable[str | None], conn_id: str | None = None) -> dict[str, Any] | None:
    """Storage options for reading and writing ``locations`` (URLs or paths; None entries are
    skipped) with the ``aws`` connection ``conn_id``.

    None when every location is on local disk. Otherwise the options of ``conn_id``, which
    must exist (``aws_default`` excepted); or, when no connection is named, those of
    ``aws_default``. Where ``aws_default`` does not exist, ``{}``: boto3's default credential
    chain (environment, profile, instance role), as every AWS hook treats ``aws_default``.
    """
    if not any(location and is_remote(location) for location in locations):
        return None
    conn_id = conn_id or DEFAULT_AWS_CONN_ID
    return options_for_connection(conn_id, missing_ok=conn_id == DEFAULT_AWS_CONN_ID)


def options_for_connection(conn_id: str, *, missing_ok: bool = False) -> dict[str, Any]:
    """s3fs-style options (``key``, ``secret``, ``token``, ``endpoint_url``, ``client_kwargs``) of an ``aws`` connection.

    A connection that does not exist is an error (``AirflowNotFoundException``): a job that
    names one must not run with other credentials (the host's own role, say) when it is
    missing or misspelt. Only with ``missing_ok`` (the default ``aws_default``, as every AWS
    hook treats it) does a missing one mean ``{}``: boto3's default credential chain
    (environment, profile, instance role) applies where the data is read and written.
    """
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException, AirflowOptionalProviderFeatureException

    try:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    except ImportError as err:
        raise AirflowOptionalProviderFeatureException(
            "S3 locations read their credentials through the Amazon provider, which is not installed: "
            "pip install 'airflow-batch-provider[s3]'"
        ) from err
    try:
        BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        if not missing_ok:
            raise AirflowNotFoundException(
                f"the Airflow connection {conn_id!r} (for S3 credentials) does not exist: create it, or name another "
                f"(storage_conn_id, s3://conn_id@bucket/..., --conn-id); leave it out to use {DEFAULT_AWS_CONN_ID!r} "
                "or, where that does not exist either, boto3's default credential chain"
            ) from None
        log.info("No %r connection: boto3's default credential chain applies", conn_id)
        return {}
    hook = AwsBaseHook(aws_conn_id=conn_id, client_type="s3")
    # AwsBaseHook.get_credentials(), except that a connection without credentials in an
    # environment without any either gives no key (not an AttributeError on None).
    session = hook.get_session()
    credentials = session.get_credentials()
    options: dict[str, Any] = {}
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()  # one consistent set, refreshed first if assumed
        _mask(frozen.secret_key, frozen.token)
        options.update(key=frozen.access_key, secret=frozen.secret_key)
        if frozen.token:
            options["token"] = frozen.token
    endpoint = hook.conn_config.get_service_endpoint_url("s3")  # service_config.s3.endpoint_url, else endpoint_url
    if endpoint:
        options["endpoint_url"] = endpoint
    region = hook.conn_config.region_name or session.region_name
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def _mask(*secrets: str | None) -> None:
    from airflow.sdk.log import mask_secret

    for secret in secrets:
        if secret:
            mask_secret(secret)
