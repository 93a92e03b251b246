"""The sink's Airflow Asset, and the partition its event names.

A templated sink (``s3://lake/emb/{{ ds }}``) is one dataset written in partitions, one per
run. Its Asset must not change from run to run (Airflow registers it when the DAG is parsed,
before anything renders), so its URI is the untemplated root of the sink
(``s3://lake/emb``); what the template rendered to in a run (``2026-12-05``) is the partition
key of that run's asset event, which a downstream DAG on a ``PartitionedAssetTimetable`` gets
as its own run's partition key. docs/assets.md argues the design.

Only Jinja's default delimiters count as templates: those are what Airflow renders in
template fields.
"""

from __future__ import annotations

import re

from airflow_batch_provider.spec import split_conn_id

#: A Jinja expression, statement or comment.
_CONSTRUCT = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)

#: Joins the values of several templated parts into one key: Airflow's composite-key
#: separator, which ``ProductMapper`` splits on.
KEY_SEPARATOR = "|"


def is_templated(sink: str) -> bool:
    """Whether the sink has a Jinja construct, i.e. renders to another path in each run."""
    return _CONSTRUCT.search(sink) is not None


def asset_root(sink: str) -> str | None:
    """The untemplated root of a templated sink: its text before the first Jinja construct,
    cut at the last ``/``. None when the sink is not templated, or when the template sits in
    the bucket or the first path component (``{{ var.value.root }}/emb``), where no stable
    path above the partitions exists."""
    sink = split_conn_id(sink)[0]
    match = _CONSTRUCT.search(sink)
    if match is None:
        return None
    head, slash, _ = sink[: match.start()].rpartition("/")
    root = head.rstrip("/")
    if not slash or not root:
        return None
    if "://" in sink:
        scheme, sep, rest = root.partition("://")
        if not sep or not scheme or not rest:  # the template is (in) the bucket
            return None
    return root


def asset_uri(sink: str) -> str:
    """The Asset's URI: the sink's root where it is templated (else the sink itself, as
    before), as a ``file://`` URI for a local path."""
    base = asset_root(sink) or split_conn_id(sink)[0].rstrip("/")
    return base if "://" in base else f"file://{base}"


def partition_key(template: str, rendered: str) -> str | None:
    """The partition a run of a templated sink wrote: what its templated parts rendered to
    (``s3://lake/emb/{{ ds }}`` -> ``2026-12-05``), joined with ``|`` where several parts
    rendered to text (``.../{{ params.model }}/{{ ds }}`` -> ``bert|2026-12-05``, the form
    ``ProductMapper`` splits). Where the rendered sink cannot be split into those values
    unambiguously (Jinja blocks such as ``{% if %}``, a value that holds the text between
    two templated parts), the key is the rendered sink's path below the Asset's URI instead,
    so ``asset_uri + "/" + key`` is the partition's location either way.

    None when the template has no Jinja construct, or it all rendered to nothing.
    """
    template = split_conn_id(template)[0].rstrip("/")
    rendered = split_conn_id(rendered)[0].rstrip("/")
    literals = _CONSTRUCT.split(template)
    if len(literals) == 1:
        return None
    # Constructs side by side (no text between them) render to one value.
    literals = [literals[0], *(part for part in literals[1:-1] if part), literals[-1]]
    lazy = re.fullmatch("(.*?)".join(map(re.escape, literals)), rendered, re.DOTALL)
    greedy = re.fullmatch("(.*)".join(map(re.escape, literals)), rendered, re.DOTALL)
    if lazy is not None and greedy is not None and lazy.groups() == greedy.groups():
        values = [value for value in lazy.groups() if value]
        return KEY_SEPARATOR.join(values) or None
    root = asset_root(template)
    if root is not None and rendered == root:  # it all rendered to nothing
        return None
    if root is not None and rendered.startswith(root + "/"):
        return rendered[len(root) + 1 :]
    return rendered or None
