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


def status_page_url(dag_id: str, task_id: str) -> str:
    """The status page of the sink a task writes, under ``[api] base_url``. It names the task
    only: the page finds the sink and the connection in the DAG, for users who may read it."""
    params: dict[str, Any] = {"dag_id": dag_id, "task_id": task_id}
    base = conf.get("api", "base_url", fallback="").rstrip("/")
    return f"{base}{STATUS_PAGE_PREFIX}/?{urlencode(params)}"


class SinkStatusLink(BaseOperatorLink):
    """Links a plan, shard or finalize task to the status page of the sink it writes."""

    name = "Sink status"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        spec = getattr(operator, "spec", None) or {}
        if not isinstance(spec, dict) or not spec.get("sink"):
            return ""
        return status_page_url(ti_key.dag_id, ti_key.task_id)
