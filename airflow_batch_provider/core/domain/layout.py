"""Where everything of one job lives, the names of its files and how they are read: the one owner of them.

::

    {sink}/part-{shard_id}.{ext}                 committed output, one per shard
    {sink}/_SUCCESS                              manifest written by finalize
    {sink}/_rejected/{shard_id}.jsonl            rows a shard rejected (bad_rows="skip"), committed with it
    {sink}/part-{shard_id}-r{n}.{ext}            rows re-drive n of a shard's rejected rows computed
    {sink}/_rejected/{shard_id}-r{n}.jsonl       rows re-drive n rejected again (or carried: unreadable ones)
    {sink}/_rejected/_retired/{name}.jsonl       rejected-row files a re-drive retired (kept for the record)
    {checkpoint_dir}/redrive/{shard_id}-r{n}.json  re-drive sentinels (the re-drives' commit records)
    {checkpoint_dir}/plan.json                   the plan, persisted once
    {checkpoint_dir}/plan.id                     its id, read by every commit (superseded plans)
    {checkpoint_dir}/reset.json                  every run that started fresh, and the reset generation
    {checkpoint_dir}/shards/{shard_id}.json      per-shard sentinels (the commit records)
    {checkpoint_dir}/quarantine/                 sentinels found broken, kept for inspection
    {checkpoint_dir}/input_schema-<fp>.json      the input schema the plan settled (per spec fingerprint)
    {checkpoint_dir}/output_schema-{fp}.json     the parts' schema under spec fingerprint fp, created once
    {checkpoint_dir}/output_schema-{fp}.widened-{h}.json  the type a column recorded as null took later, created once

:class:`SinkLayout` knows a sink from its URL (and ``checkpoint_dir``) alone, as the CLI and
the status page do; :class:`JobStorage` is that layout with the job's spec and source, as
planning, the shards and finalize use it. For users, with ``_staging/`` and how readers see
the sink: docs/operating.md, "Sink layout".
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, NamedTuple

from airflow_batch_provider.core.domain.planning import Plan
from airflow_batch_provider.core.errors import StaleCheckpointError
from airflow_batch_provider.core.spec import FORMAT_EXTENSIONS, JobSpec, default_checkpoint_root, file_extension
from airflow_batch_provider.core.stores import FileInfo, StagedPart, Store, store_for
from airflow_batch_provider.core.stores.urls import check_location

#: the version of the sentinel's format this code writes and reads (a file format's version,
#: not a tunable)
SENTINEL_SCHEMA_VERSION = 1

PART_PREFIX = "part-"
SENTINEL_DIR = "shards"
SENTINEL_SUFFIX = ".json"
QUARANTINE_DIR = "quarantine"
MANIFEST_NAME = "_SUCCESS"
PLAN_NAME = "plan.json"
PLAN_ID_NAME = "plan.id"
RESET_NAME = "reset.json"
REJECTED_DIR = "_rejected"
REJECTED_SUFFIX = ".jsonl"
REDRIVE_DIR = "redrive"
RETIRED_DIR = "_retired"
REDRIVE_MARK = "-r"
OUTPUT_SCHEMA_PREFIX = "output_schema-"
INPUT_SCHEMA_PREFIX = "input_schema-"
_PART_EXTENSIONS = tuple(FORMAT_EXTENSIONS[f][0] for f in FORMAT_EXTENSIONS)


def part_name(shard_id: str, sink_format: str) -> str:
    return f"{PART_PREFIX}{shard_id}{file_extension(sink_format)}"


def rejected_dir(sink_root: str) -> str:
    return f"{sink_root}/{REJECTED_DIR}"


def rejected_path(sink_root: str, shard_id: str) -> str:
    """Where the rows shard ``shard_id`` rejected go: hidden from dataset readers (``_``)."""
    return f"{rejected_dir(sink_root)}/{shard_id}{REJECTED_SUFFIX}"


def is_part_name(name: str) -> bool:
    """Whether a file name in a sink has the form of our part files (any sink format)."""
    return name.startswith(PART_PREFIX) and name.endswith(_PART_EXTENSIONS)


def redrive_id(shard_id: str, generation: int) -> str:
    """The id of re-drive ``generation`` (1, 2, ...) of shard ``shard_id``'s rejected rows: it
    names the re-drive's part, rejected-rows file and sentinel as a shard id names a shard's."""
    return f"{shard_id}{REDRIVE_MARK}{generation}"


def split_redrive_id(unit_id: str) -> tuple[str, int]:
    """(shard id, generation) of a re-drive id; (the id, 0) for a shard's own id. Shard ids are
    hex, so ``-r`` cannot occur in one."""
    shard_id, mark, generation = unit_id.rpartition(REDRIVE_MARK)
    if mark and generation.isdigit() and shard_id:
        return shard_id, int(generation)
    return unit_id, 0


class InvalidSentinel(Exception):
    """A sentinel that cannot be trusted (corrupt, unknown schema, wrong shard)."""


def parse_sentinel(raw: bytes, where: str, shard_id: str, *, strict: bool = True) -> dict[str, Any]:
    """The commit record of shard ``shard_id`` in ``raw`` (read from ``where``); the one reader of
    sentinels, at two levels of trust, because its readers do two different things with it:

    - ``strict`` (the commit protocol, which acts on the record: skips the shard, publishes,
      withdraws): the record must be complete and of the schema this code writes. Anything
      else raises :class:`InvalidSentinel` (its shard is quarantined and computed again); a
      schema newer than this code fails closed (``StaleCheckpointError``: a newer provider
      committed it, and this one must change nothing).
    - not ``strict`` (status, verify and gc, which only report): any JSON object that names
      its shard counts, so that a sink committed by another version of the provider is still
      shown as it is rather than refused. Only what names no shard raises ``InvalidSentinel``.
    """
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise InvalidSentinel(f"{where}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise InvalidSentinel(f"{where}: not a JSON object")
    if not strict:
        if data.get("shard_id") != shard_id:
            raise InvalidSentinel(f"{where}: records shard {data.get('shard_id')!r}, not {shard_id!r}")
        return data
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SENTINEL_SCHEMA_VERSION:
        raise StaleCheckpointError(
            f"{where} has sentinel schema_version {version}, newer than this provider knows "
            f"({SENTINEL_SCHEMA_VERSION}): a newer version of airflow-batch-provider committed it. "
            "Upgrade the provider on every worker; nothing was changed."
        )
    if version != SENTINEL_SCHEMA_VERSION:
        raise InvalidSentinel(f"{where}: unknown schema_version {data.get('schema_version')!r}")
    missing = [k for k in ("shard_id", "bytes", "rows_out", "spec_fingerprint", "input_fingerprint") if k not in data]
    if missing:
        raise InvalidSentinel(f"{where}: missing field(s) {missing}")
    if data["shard_id"] != shard_id:
        raise InvalidSentinel(f"{where}: records shard {data['shard_id']!r}, not {shard_id!r}")
    return data


class SentinelRead(NamedTuple):
    """One sentinel as read: its bytes (None: there is none), its record (None: none, or one
    that cannot be trusted) and why it cannot be trusted ("" otherwise)."""

    raw: bytes | None
    record: dict[str, Any] | None
    invalid: str = ""


class SinkLayout:
    """The stores and files of a sink and its checkpoint directory, known from their URLs alone.

    :param sink_root: the sink's URL, without trailing ``/``.
    :param checkpoint_root: the checkpoint directory's URL, without trailing ``/``.
    :param sink: the store that serves ``sink_root``.
    :param checkpoint: the store that serves ``checkpoint_root``.
    """

    def __init__(self, sink_root: str, checkpoint_root: str, sink: Store, checkpoint: Store):
        self.sink_root = sink_root
        self.checkpoint_root = checkpoint_root
        self.sink = sink
        self.checkpoint = checkpoint

    @classmethod
    def at(cls, sink: str, checkpoint_dir: str | None = None, storage_options: dict[str, Any] | None = None) -> SinkLayout:
        """The layout of the sink at URL ``sink`` (its checkpoint in ``checkpoint_dir``, else
        the default place); a one-line ``BatchSpecError`` for a URL no store serves."""
        sink_root = check_location(sink, "sink").rstrip("/")
        checkpoint_root = check_location(checkpoint_dir or default_checkpoint_root(sink_root), "checkpoint_dir").rstrip("/")
        return cls(sink_root, checkpoint_root, store_for(sink_root, storage_options), store_for(checkpoint_root, storage_options))

    # -- where the files are ---------------------------------------------------------------

    @property
    def sentinel_dir(self) -> str:
        return f"{self.checkpoint_root}/{SENTINEL_DIR}"

    def sentinel_path(self, shard_id: str) -> str:
        return f"{self.sentinel_dir}/{shard_id}{SENTINEL_SUFFIX}"

    @property
    def quarantine_dir(self) -> str:
        return f"{self.checkpoint_root}/{QUARANTINE_DIR}"

    def quarantine_path(self, shard_id: str, stamp_ms: int) -> str:
        return f"{self.quarantine_dir}/{shard_id}.{stamp_ms}.json"

    @property
    def rejected_dir(self) -> str:
        return rejected_dir(self.sink_root)

    def rejected_path(self, shard_id: str) -> str:
        return rejected_path(self.sink_root, shard_id)

    @property
    def retired_dir(self) -> str:
        """Where re-drives move the rejected-row files they retired: below ``_rejected/``, so
        ``read_json('sink/_rejected/*.jsonl')`` reads only the rows still rejected."""
        return f"{self.rejected_dir}/{RETIRED_DIR}"

    def retired_path(self, name: str) -> str:
        return f"{self.retired_dir}/{name}"

    @property
    def redrive_dir(self) -> str:
        return f"{self.checkpoint_root}/{REDRIVE_DIR}"

    def redrive_sentinel_path(self, unit_id: str) -> str:
        return f"{self.redrive_dir}/{unit_id}{SENTINEL_SUFFIX}"

    def redrive_sentinel_files(self) -> dict[str, FileInfo]:
        """The re-drive sentinels, by name: one listing (none when nothing was re-driven)."""
        return {n: info for n, info in self.checkpoint.list_files(self.redrive_dir).items() if n.endswith(SENTINEL_SUFFIX)}

    def read_redrive_sentinel(self, unit_id: str, *, strict: bool = True) -> SentinelRead:
        """Re-drive ``unit_id``'s sentinel, parsed as a shard's is (``parse_sentinel``)."""
        path = self.redrive_sentinel_path(unit_id)
        raw = self.checkpoint.read_bytes(path)
        if raw is None:
            return SentinelRead(None, None)
        try:
            return SentinelRead(raw, parse_sentinel(raw, path, unit_id, strict=strict))
        except InvalidSentinel as err:
            return SentinelRead(raw, None, str(err))

    @property
    def plan_path(self) -> str:
        return f"{self.checkpoint_root}/{PLAN_NAME}"

    @property
    def plan_id_path(self) -> str:
        return f"{self.checkpoint_root}/{PLAN_ID_NAME}"

    @property
    def reset_path(self) -> str:
        return f"{self.checkpoint_root}/{RESET_NAME}"

    @property
    def manifest_path(self) -> str:
        return f"{self.sink_root}/{MANIFEST_NAME}"

    # -- what is there: one listing each ---------------------------------------------------

    def sentinel_files(self) -> dict[str, FileInfo]:
        """The sentinel files, by name: one (paginated) listing of the sentinel directory."""
        return {n: info for n, info in self.checkpoint.list_files(self.sentinel_dir).items() if n.endswith(SENTINEL_SUFFIX)}

    def committed_ids(self) -> set[str]:
        """Shard ids with a sentinel: one (paginated) listing of the sentinel directory."""
        return {name[: -len(SENTINEL_SUFFIX)] for name in self.sentinel_files()}

    def part_files(self) -> dict[str, FileInfo]:
        """The part files in the sink (ours or any run's), by name: one listing."""
        return {n: info for n, info in self.sink.list_files(self.sink_root).items() if is_part_name(n)}

    def rejected_files(self) -> dict[str, FileInfo]:
        """The rejected-row files in the sink, by name: one listing."""
        return {n: info for n, info in self.sink.list_files(self.rejected_dir).items() if n.endswith(REJECTED_SUFFIX)}

    def staged_parts(self) -> list[StagedPart]:
        """Parts and rejected-row files staged under the sink and never published (crashed or
        losing attempts)."""
        parts = [s for s in self.sink.list_staged(self.sink_root) if is_part_name(s.final_path.rsplit("/", 1)[-1])]
        rejected = [s for s in self.sink.list_staged(self.rejected_dir) if s.final_path.endswith(REJECTED_SUFFIX)]
        return parts + rejected

    # -- reading them ----------------------------------------------------------------------

    def read_plan(self) -> Plan | None:
        raw = self.checkpoint.read_bytes(self.plan_path)
        return None if raw is None else Plan.from_json(raw, self.plan_path)

    def read_sentinel(self, shard_id: str, *, strict: bool = True) -> SentinelRead:
        """Shard ``shard_id``'s sentinel: one GET, parsed by :func:`parse_sentinel` (``strict``
        as there; a newer schema raises when strict)."""
        path = self.sentinel_path(shard_id)
        raw = self.checkpoint.read_bytes(path)
        if raw is None:
            return SentinelRead(None, None)
        try:
            return SentinelRead(raw, parse_sentinel(raw, path, shard_id, strict=strict))
        except InvalidSentinel as err:
            return SentinelRead(raw, None, str(err))


class JobStorage(SinkLayout):
    """The stores and paths of one job: its source, its sink and its checkpoint directory."""

    def __init__(self, spec: JobSpec, source: Store, sink: Store, checkpoint: Store):
        super().__init__(spec.sink_root, spec.checkpoint_root, sink, checkpoint)
        self.spec = spec
        self.source = source

    @classmethod
    def for_spec(cls, spec: JobSpec, storage_options: dict[str, Any] | None = None) -> JobStorage:
        return cls(
            spec,
            store_for(spec.source, storage_options),
            store_for(spec.sink_root, storage_options),
            store_for(spec.checkpoint_root, storage_options),
        )

    def part_name(self, shard_id: str) -> str:
        return part_name(shard_id, self.spec.sink_format)

    def part_path(self, shard_id: str) -> str:
        return f"{self.sink_root}/{self.part_name(shard_id)}"

    @property
    def input_schema_path(self) -> str:
        """Per spec fingerprint, like the output schema: a second spec racing to plan the same
        empty sink (and refused) never replaces the input schema the first spec's shards read."""
        return f"{self.checkpoint_root}/{INPUT_SCHEMA_PREFIX}{self.spec.fingerprint}.json"

    @property
    def output_schema_path(self) -> str:
        """Per spec fingerprint: a spec planned afresh over an uncommitted sink never inherits
        the output schema an earlier spec's shards recorded."""
        return f"{self.checkpoint_root}/{OUTPUT_SCHEMA_PREFIX}{self.spec.fingerprint}.json"

    def output_widening_path(self, column: str) -> str:
        """The type output column ``column``, recorded as null, took when a later shard held a
        value in it: one create-only file per column (named by a hash: any column name is safe)."""
        digest = hashlib.sha256(column.encode()).hexdigest()[:16]
        return f"{self.checkpoint_root}/{OUTPUT_SCHEMA_PREFIX}{self.spec.fingerprint}.widened-{digest}.json"
