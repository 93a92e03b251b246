"""The sink status page: an Airflow 3 plugin (a FastAPI app in the api-server and a view in the UI).

For the sink of one batch inference task it shows the shards committed / pending / quarantined,
rows in and out, rejected rows, bytes, tokens and tokens/s (where the predictor counts them),
GPU-hours and their cost (with a ``gpu_hour_price``), throughput per minute as a chart, the last commits and
any problem the listings show, all from the sink's own files (``core.api.sink_status``). Tasks
link here through the "Sink status" extra link.

Who sees what: the page is asked for a task (``dag_id`` and ``task_id``), never for a path or a
connection. The user must be allowed to read that DAG (the auth manager's ``is_authorized_dag``,
as Airflow's own DAG routes ask it); the sink, its checkpoint and the connection come from the
task's spec in the serialized DAG, and the sink is read with the DAG's own connection. So the
api-server's credentials (and every connection's) read only sinks of DAGs the user may read,
never a bucket or local file the user names. Errors reading a sink give the user one fixed
sentence; the details go to the api-server's log.
"""

from __future__ import annotations

import html
import logging
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode

from airflow.api_fastapi.core_api.security import GetUserDep
from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse

from airflow_batch_provider.core import api
from airflow_batch_provider.links.sink_status import STATUS_PAGE_PREFIX, SinkStatusLink, status_page_url

log = logging.getLogger(__name__)

app = FastAPI(title="Batch inference sink status", docs_url=None, redoc_url=None, openapi_url=None)

#: what a user is told when a sink cannot be read (AccessDenied, NoSuchBucket, a missing
#: connection...): the same words whatever the cause; the api-server's log has the cause.
CANNOT_READ = "The sink of this task cannot be read right now. The api-server's log says why."
NOT_YET = "Nothing of this job is in its sink yet: its plan task has not run (or the sink was moved)."
TEMPLATED = "This task's sink is templated: the page reads sinks whose URL is written out in the DAG."
_QUERY = {"dag_id", "task_id"}


class _Unreadable(Exception):
    """A sentence for the user (never the underlying error's text) and the HTTP status."""

    def __init__(self, text: str, code: int):
        super().__init__(text)
        self.code = code


def _readable(user: Any, dag_id: str) -> bool:
    """Whether ``user`` may read DAG ``dag_id``: the check Airflow's ``requires_access_dag("GET")`` makes."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
    from airflow.models.dag import DagModel

    details = DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id))
    return get_auth_manager().is_authorized_dag(method="GET", details=details, user=user)


def _task_spec(task: Any) -> dict[str, Any] | None:
    """The batch spec a (serialized, maybe mapped) task holds, if it is a batch inference task."""
    spec = getattr(task, "spec", None)
    if not isinstance(spec, dict):
        spec = (getattr(task, "partial_kwargs", None) or {}).get("spec")
    return spec if isinstance(spec, dict) and spec.get("sink") else None


def _is_batch_task(task: Any) -> bool:
    """Whether a serialized task is one of this provider's (plan, shard, finalize)."""
    module = getattr(task, "_task_module", None) or getattr(task, "task_type_module", None) or ""
    return str(module).startswith("airflow_batch_provider.")


def _spec_of(user: Any, dag_id: str, task_id: str) -> Any:
    """The spec (``airflow_batch_provider.spec.BatchSpec``) of a batch task of a DAG the user
    may read: 403 when they may not, whether or not the DAG exists (as Airflow's own routes
    answer), 404 when the DAG has no such batch task."""
    if not _readable(user, dag_id):
        raise HTTPException(403, "Forbidden")
    from airflow.models.serialized_dag import SerializedDagModel

    from airflow_batch_provider.spec import BatchSpec

    dag = SerializedDagModel.get_dag(dag_id)
    task = dag.task_dict.get(task_id) if dag is not None else None
    spec = _task_spec(task) if task is not None else None
    if spec is None and task is not None and _is_batch_task(task):
        # A mapped shard task's partial spec is serialized as text: its plan task (upstream, in
        # the same task group) holds the same spec as a dict.
        spec = next((found for t in sorted(task.upstream_list, key=lambda t: t.task_id) if (found := _task_spec(t))), None)
    if spec is None:
        raise HTTPException(404, f"DAG {dag_id!r} has no batch inference task {task_id!r}")
    return BatchSpec.from_dict(spec)


def _status(spec: Any) -> api.SinkStatus:
    """The sink's figures, read with the DAG's own connection (``storage_conn_id``), as its tasks do."""
    from airflow_batch_provider.hooks.storage import storage_options_for

    if "{{" in spec.sink_root or "{{" in (spec.checkpoint_dir or ""):
        raise _Unreadable(TEMPLATED, 404)
    try:
        return api.sink_status(spec.sink_root, spec.checkpoint_dir, storage_options_for(spec), gpu_hour_price=spec.gpu_hour_price)
    except api.NotASinkError:
        raise _Unreadable(NOT_YET, 404) from None
    except Exception:
        log.exception("the sink status of %s (storage_conn_id=%s) could not be read", spec.sink_root, spec.storage_conn_id)
        raise _Unreadable(CANNOT_READ, 503) from None


def _check_query(request: Request) -> None:
    """Refuse a path, a checkpoint or a connection in the query: the DAG names them."""
    unknown = sorted(set(request.query_params) - _QUERY)
    if unknown:
        raise HTTPException(400, f"this page takes dag_id and task_id only, not {', '.join(unknown)}: the sink and "
                                 "its connection come from the DAG")


@app.get("/status.json")
def status_json(request: Request, user: GetUserDep, dag_id: str, task_id: str) -> JSONResponse:
    _check_query(request)
    spec = _spec_of(user, dag_id, task_id)
    try:
        return JSONResponse(_status(spec).to_dict())
    except _Unreadable as err:
        return JSONResponse({"error": str(err)}, status_code=err.code)


@app.get("/", response_class=HTMLResponse)
def page(request: Request, user: GetUserDep, dag_id: str | None = None, task_id: str | None = None) -> HTMLResponse:
    _check_query(request)
    if not dag_id or not task_id:
        return HTMLResponse(_frame("Batch inference sinks", _index(user)))
    spec = _spec_of(user, dag_id, task_id)
    try:
        status = _status(spec)
    except _Unreadable as err:
        return HTMLResponse(_frame(f"Sink of {dag_id} / {task_id}", f"<p class='error'>{html.escape(str(err))}</p>"),
                            status_code=err.code)
    return HTMLResponse(_frame(f"Sink {status.sink}", render(status, spec.storage_conn_id),
                               refresh=None if status.finalized_at else 15))


def _index(user: Any) -> str:
    """The sinks of the batch tasks in the DAGs this user may read (one row per DAG and sink),
    from the serialized DAGs: no sink is read to draw it."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.models.serialized_dag import SerializedDagModel

    dag_ids = sorted(get_auth_manager().get_authorized_dag_ids(user=user, method="GET"))
    rows, seen = [], set()
    for model in SerializedDagModel.get_latest_serialized_dags(dag_ids=dag_ids) if dag_ids else []:
        dag = model.dag
        for task in sorted(dag.task_dict.values(), key=lambda t: t.task_id):
            spec = _task_spec(task)
            if spec is None or (dag.dag_id, spec["sink"]) in seen:
                continue
            seen.add((dag.dag_id, spec["sink"]))
            query = html.escape(urlencode({"dag_id": dag.dag_id, "task_id": task.task_id}))
            rows.append(f"<tr><td>{html.escape(dag.dag_id)}</td><td><a href='{STATUS_PAGE_PREFIX}/?{query}'>"
                        f"{html.escape(spec['sink'])}</a></td><td>{html.escape(task.task_id)}</td></tr>")
    if not rows:
        return "<p>No batch inference task in the DAGs you may read.</p>"
    return "<table id='sinks'><tr><th>DAG</th><th>sink</th><th>task</th></tr>" + "".join(sorted(rows)) + "</table>"


def render(status: api.SinkStatus, conn_id: str | None) -> str:
    """The page body for one sink (all values escaped)."""
    e = html.escape
    done = status.committed / status.planned_shards if status.planned_shards else 0.0
    rate = status.rows_per_second
    figures = [
        ("Shards committed", f"{status.committed:,} of {status.planned_shards:,}"),
        ("Shards pending", f"{status.pending:,}"),
        ("Shards quarantined", f"{status.quarantined:,}"),
        ("Rows in", f"{status.rows_in:,} of {status.planned_rows:,}"),
        ("Rows out", f"{status.rows_out:,}"),
        ("Rows rejected", f"{status.rows_rejected:,}"),
        ("Rows re-driven", f"{status.rows_redriven:,}"),  # computed again after a fix: docs/redrive.md
        ("Bytes written", f"{status.bytes / (1 << 20):,.1f} MiB"),
        ("Throughput", f"{rate:,.0f} rows/s" if rate else "-"),
    ]
    counters, per_second = status.counters, status.counters_per_second
    for name in ("tokens_in", "tokens_out"):  # the predictor's token counts, tokens/s beside rows/s
        if name in counters:
            figures.append((name.replace("_", " ").capitalize(), f"{counters[name]:,}"))
            figures.append((f"{name.replace('_', ' ').capitalize()}/s", f"{per_second[name]:,.0f}" if name in per_second else "-"))
    figures.append(("GPU-hours", f"{counters.get('gpu_seconds', 0) / 3600:,.3f}"))
    if status.cost is not None:
        figures.append(("Cost", f"{status.cost:,.2f} at {status.gpu_hour_price:g} per GPU-hour"))
    figures.append(("Finalized", _when(status.finalized_at) if status.finalized_at else "not yet"))
    cards = "".join(f"<div class='card'><div class='label'>{e(k)}</div><div class='value' data-figure='{e(k)}'>{e(v)}</div></div>"
                    for k, v in figures)
    commits = "".join(
        f"<tr><td>{e(_when(c.committed_at))}</td><td>{e(c.shard_id)}</td><td>{c.rows_in:,}</td><td>{c.rows_out:,}</td>"
        f"<td>{c.bytes / (1 << 20):,.2f} MiB</td><td>{e(c.part)}</td></tr>"
        for c in status.last_commits
    )
    source = f"the DAG's connection <code>{e(conn_id)}</code>" if conn_id else "the DAG's default connection"
    problems = "".join(f"<li>{e(p)}</li>" for p in status.problems)
    return (
        f"<p class='where'>{e(status.sink)} &middot; checkpoint {e(status.checkpoint_dir)} &middot; read with {source} "
        f"in {status.seconds:.2f} s</p>"
        + (f"<h2 class='error'>Problems</h2><ul id='problems'>{problems}</ul>" if problems else "")
        + f"<div class='progress'><div style='width:{done * 100:.1f}%'></div></div>"
        f"<div class='cards'>{cards}</div>"
        f"<h2>Rows per minute</h2>{_chart(status.throughput)}"
        f"<h2>Last commits</h2><table id='commits'><tr><th>committed</th><th>shard</th><th>rows in</th><th>rows out</th>"
        f"<th>bytes</th><th>part</th></tr>{commits or '<tr><td colspan=6>none yet</td></tr>'}</table>"
    )


def _chart(series: list[tuple[float, int]], width: int = 720, height: int = 160) -> str:
    """Rows per minute as an inline SVG bar chart (no script, no external assets)."""
    if not series:
        return "<p>No commits yet.</p>"
    top = max(rows for _, rows in series) or 1
    step = width / len(series)
    bars = []
    for index, (minute, rows) in enumerate(series):
        bar = (rows / top) * (height - 20)
        label = f"{_when(minute)}: {rows:,} rows"
        bars.append(f"<rect x='{index * step + 1:.1f}' y='{height - bar:.1f}' width='{max(step - 2, 1):.1f}' height='{bar:.1f}'>"
                    f"<title>{html.escape(label)}</title></rect>")
    return (f"<svg id='throughput' viewBox='0 0 {width} {height}' width='{width}' height='{height}' role='img' "
            f"aria-label='rows per minute'><text x='4' y='12'>{top:,} rows/min</text>{''.join(bars)}</svg>")


def _when(stamp: float | None) -> str:
    return datetime.fromtimestamp(stamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if stamp else "-"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#1b1f24} h1{font-size:20px} h2{font-size:16px;margin-top:28px}
.where{color:#555} .cards{display:flex;flex-wrap:wrap;gap:12px} .card{border:1px solid #d0d7de;border-radius:6px;padding:10px 14px;min-width:150px}
.label{font-size:12px;color:#57606a} .value{font-size:18px;font-weight:600} .error{color:#b00020}
.progress{height:8px;background:#eaeef2;border-radius:4px;margin:12px 0} .progress div{height:8px;background:#2da44e;border-radius:4px}
table{border-collapse:collapse} td,th{border-bottom:1px solid #d0d7de;padding:4px 10px;text-align:left;font-size:13px}
svg rect{fill:#0969da} svg text{font-size:11px;fill:#57606a}
"""


def _frame(title: str, body: str, refresh: int | None = None) -> str:
    meta = f"<meta http-equiv='refresh' content='{refresh}'>" if refresh else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'>{meta}<title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


class BatchSinkStatusPlugin(AirflowPlugin):
    """Registers the status app in the api-server, a "Batch sinks" view in the UI's navigation,
    and the "Sink status" extra link of the batch operators."""

    name = "batch_sink_status"
    fastapi_apps = [{"app": app, "url_prefix": STATUS_PAGE_PREFIX, "name": "Batch inference sink status"}]
    external_views = [
        {"name": "Batch sinks", "href": f"{STATUS_PAGE_PREFIX}/", "destination": "nav", "url_route": "batch-sinks"},
    ]
    operator_extra_links = [SinkStatusLink()]


__all__ = ["BatchSinkStatusPlugin", "app", "render", "status_page_url"]
