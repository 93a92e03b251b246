"""Credentials for S3 sources and sinks, from a standard Airflow ``aws`` connection.

``login``/``password`` are the access key and secret, extra ``endpoint_url`` and
``region_name`` point at S3-compatible stores. The values are handed to fsspec/boto3 as
storage options and to the Ray workers as call arguments; they are never logged, pushed to
XCom or put into templated fields (the spec only names the connection).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from airflow_batch_provider.core.api import needs_credentials
from airflow_batch_provider.spec import BatchSpec

DEFAULT_AWS_CONN_ID = "aws_default"


class ObjectStorageHook(BaseHook):
    """Reads an ``aws`` connection into fsspec/s3fs storage options.

    :param aws_conn_id: the connection; when it does not exist, boto3's default credential
        chain (environment, profile, instance role) applies.
    """

    conn_name_attr = "aws_conn_id"
    default_conn_name = DEFAULT_AWS_CONN_ID
    conn_type = "aws"
    hook_name = "Amazon Web Services (batch provider)"

    def __init__(self, aws_conn_id: str = DEFAULT_AWS_CONN_ID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.aws_conn_id = aws_conn_id

    def storage_options(self) -> dict[str, Any]:
        try:
            conn = self.get_connection(self.aws_conn_id)
        except Exception as err:
            if type(err).__name__ not in ("AirflowNotFoundException", "ConnectionNotFound"):
                raise
            self.log.info("No %r connection: boto3's default credential chain applies", self.aws_conn_id)
            return {}
        extra = conn.extra_dejson or {}
        options: dict[str, Any] = {}
        if conn.login:
            options["key"] = conn.login
        if conn.password:
            options["secret"] = conn.password
        if extra.get("aws_session_token"):
            options["token"] = extra["aws_session_token"]
        client_kwargs = {}
        endpoint = extra.get("endpoint_url") or (extra.get("service_config", {}).get("s3", {}).get("endpoint_url"))
        if endpoint:
            options["endpoint_url"] = endpoint
        if extra.get("region_name"):
            client_kwargs["region_name"] = extra["region_name"]
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        return options


def storage_options_for(spec: BatchSpec) -> dict[str, Any] | None:
    """Storage options for the spec's URLs: None when everything is on local disk."""
    if not needs_credentials(spec):
        return None
    return ObjectStorageHook(spec.storage_conn_id or DEFAULT_AWS_CONN_ID).storage_options()


def options_for_connection(conn_id: str) -> dict[str, Any]:
    """Storage options of the named connection (for tools outside a task, such as the CLI)."""
    return ObjectStorageHook(conn_id).storage_options()
