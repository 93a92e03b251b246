"""The sink status page: an Airflow 3 plugin (a FastAPI app in the api-server and a view in the UI).

For one sink it shows the shards committed / pending / quarantined, rows in and out, rejected
rows, bytes, throughput per minute as a chart, and the last commits, all from the sink's own
files (``core.api.sink_status``), read with the same Airflow connection the tasks use. The
page and its JSON twin (``status.json``) need a logged-in Airflow user; they name connections,
never show their secrets. Tasks link here through the "Sink status" extra link.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone

from airflow.api_fastapi.core_api.security import GetUserDep
from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, JSONResponse

from airflow_batch_provider.core import api
from airflow_batch_provider.links.sink_status import STATUS_PAGE_PREFIX, SinkStatusLink, status_page_url

app = FastAPI(title="Batch inference sink status", docs_url=None, redoc_url=None, openapi_url=None)


def _status(sink: str, checkpoint_dir: str | None, conn_id: str | None) -> api.SinkStatus:
    options = None
    if api.is_remote(sink) or (checkpoint_dir and api.is_remote(checkpoint_dir)):
        from airflow_batch_provider.hooks.storage import options_for_connection

        options = options_for_connection(conn_id or "aws_default")
    return api.sink_status(sink, checkpoint_dir, options)


@app.get("/status.json")
def status_json(
    user: GetUserDep,  # a logged-in Airflow user (Bearer token or the UI's cookie)
    sink: str = Query(..., description="the sink URL or path"),
    checkpoint_dir: str | None = None,
    conn_id: str | None = None,
) -> JSONResponse:
    try:
        return JSONResponse(_status(sink, checkpoint_dir, conn_id).to_dict())
    except api.BatchError as err:
        return JSONResponse({"error": str(err)}, status_code=400)


@app.get("/", response_class=HTMLResponse)
def page(user: GetUserDep, sink: str | None = None, checkpoint_dir: str | None = None, conn_id: str | None = None) -> HTMLResponse:
    if not sink:
        return HTMLResponse(_frame("Batch inference sinks", _FORM))
    try:
        status = _status(sink, checkpoint_dir, conn_id)
    except (api.BatchError, OSError, ValueError) as err:
        return HTMLResponse(_frame("Sink status", f"<p class='error'>Cannot read {html.escape(sink)}: {html.escape(str(err))}</p>"
                                   + _FORM), status_code=400)
    return HTMLResponse(_frame(f"Sink {sink}", render(status, conn_id), refresh=None if status.finalized_at else 15))


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
        ("Bytes written", f"{status.bytes / (1 << 20):,.1f} MiB"),
        ("Throughput", f"{rate:,.0f} rows/s" if rate else "-"),
        ("Finalized", _when(status.finalized_at) if status.finalized_at else "not yet"),
    ]
    cards = "".join(f"<div class='card'><div class='label'>{e(k)}</div><div class='value' data-figure='{e(k)}'>{e(v)}</div></div>"
                    for k, v in figures)
    commits = "".join(
        f"<tr><td>{e(_when(c.committed_at))}</td><td>{e(c.shard_id)}</td><td>{c.rows_in:,}</td><td>{c.rows_out:,}</td>"
        f"<td>{c.bytes / (1 << 20):,.2f} MiB</td><td>{e(c.part)}</td></tr>"
        for c in status.last_commits
    )
    source = f"connection <code>{e(conn_id)}</code>" if conn_id else "local files or the api-server's AWS environment"
    return (
        f"<p class='where'>{e(status.sink)} &middot; checkpoint {e(status.checkpoint_dir)} &middot; read with {source} "
        f"in {status.seconds:.2f} s</p>"
        f"<div class='progress'><div style='width:{done * 100:.1f}%'></div></div>"
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


_FORM = (f"<form method='get' action='{STATUS_PAGE_PREFIX}/'><label>Sink <input name='sink' size='60' "
         "placeholder='s3://bucket/prefix or /data/out'></label> <label>Connection <input name='conn_id' "
         "placeholder='aws_default'></label> <button type='submit'>Show</button></form>")

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
