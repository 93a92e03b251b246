"""The "Sink status" button on a batch inference task: opens the sink's status page."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from airflow.sdk import BaseOperatorLink, conf

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

#: where the status page's app is mounted in the api-server (``plugins/sink_status.py``)
STATUS_PAGE_PREFIX = "/batch-sink-status"


def status_page_url(sink: str, checkpoint_dir: str | None = None, conn_id: str | None = None) -> str:
    """The status page of a sink, under ``[api] base_url``. Names the connection, never its secrets."""
    params: dict[str, Any] = {"sink": sink}
    if checkpoint_dir:
        params["checkpoint_dir"] = checkpoint_dir
    if conn_id:
        params["conn_id"] = conn_id
    base = conf.get("api", "base_url", fallback="").rstrip("/")
    return f"{base}{STATUS_PAGE_PREFIX}/?{urlencode(params)}"


class SinkStatusLink(BaseOperatorLink):
    """Links a plan, shard or finalize task to the status page of the sink it writes."""

    name = "Sink status"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        spec = getattr(operator, "spec", None) or {}
        if not spec.get("sink"):
            return ""
        from airflow_batch_provider.spec import BatchSpec

        parsed = BatchSpec.from_dict(spec)
        return status_page_url(parsed.sink_root, parsed.checkpoint_dir, parsed.storage_conn_id)
