"""Where everything of one job lives, and the names of its files: the one owner of them.

::

    {sink}/part-{shard_id}.{ext}                 committed output, one per shard
    {sink}/_SUCCESS                              manifest written by finalize
    {sink}/_rejected/{shard_id}.jsonl            rows a shard rejected (bad_rows="skip"), committed with it
    {checkpoint_dir}/plan.json                   the plan, persisted once
    {checkpoint_dir}/plan.id                     its id, read by every commit (superseded plans)
    {checkpoint_dir}/reset.json                  every run that started fresh, and the reset generation
    {checkpoint_dir}/shards/{shard_id}.json      per-shard sentinels (the commit records)
    {checkpoint_dir}/quarantine/                 sentinels found broken, kept for inspection
    {checkpoint_dir}/input_schema-<fp>.json      the input schema the plan settled (per spec fingerprint)
    {checkpoint_dir}/output_schema-{fp}.json     the parts' schema under spec fingerprint fp, created once
    {checkpoint_dir}/output_schema-{fp}.widened-{h}.json  the type a column recorded as null took later, created once
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from airflow_batch_provider.core.spec import FORMAT_EXTENSIONS, BatchSpec, file_extension
from airflow_batch_provider.core.stores import Store, store_for

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
OUTPUT_SCHEMA_PREFIX = "output_schema-"
INPUT_SCHEMA_PREFIX = "input_schema-"
_PART_EXTENSIONS = tuple(FORMAT_EXTENSIONS[f][0] for f in FORMAT_EXTENSIONS)


def part_name(shard_id: str, sink_format: str) -> str:
    return f"{PART_PREFIX}{shard_id}{file_extension(sink_format)}"


def sentinel_dir(checkpoint_root: str) -> str:
    return f"{checkpoint_root}/{SENTINEL_DIR}"


def quarantine_dir(checkpoint_root: str) -> str:
    return f"{checkpoint_root}/{QUARANTINE_DIR}"


def plan_path(checkpoint_root: str) -> str:
    return f"{checkpoint_root}/{PLAN_NAME}"


def manifest_path(sink_root: str) -> str:
    return f"{sink_root}/{MANIFEST_NAME}"


def rejected_dir(sink_root: str) -> str:
    return f"{sink_root}/{REJECTED_DIR}"


def rejected_path(sink_root: str, shard_id: str) -> str:
    """Where the rows shard ``shard_id`` rejected go: hidden from dataset readers (``_``)."""
    return f"{rejected_dir(sink_root)}/{shard_id}{REJECTED_SUFFIX}"


def is_part_name(name: str) -> bool:
    """Whether a file name in a sink has the form of our part files (any sink format)."""
    return name.startswith(PART_PREFIX) and name.endswith(_PART_EXTENSIONS)


@dataclass
class JobStorage:
    """The stores and paths of one job: its source, its sink and its checkpoint directory."""

    spec: BatchSpec
    source: Store
    sink: Store
    checkpoint: Store

    @classmethod
    def for_spec(cls, spec: BatchSpec, storage_options: dict[str, Any] | None = None) -> JobStorage:
        return cls(
            spec,
            store_for(spec.source, storage_options),
            store_for(spec.sink_root, storage_options),
            store_for(spec.checkpoint_root, storage_options),
        )

    def part_name(self, shard_id: str) -> str:
        return part_name(shard_id, self.spec.sink_format)

    def part_path(self, shard_id: str) -> str:
        return f"{self.spec.sink_root}/{self.part_name(shard_id)}"

    @property
    def sentinel_dir(self) -> str:
        return sentinel_dir(self.spec.checkpoint_root)

    def sentinel_path(self, shard_id: str) -> str:
        return f"{self.sentinel_dir}/{shard_id}{SENTINEL_SUFFIX}"

    def quarantine_path(self, shard_id: str, stamp_ms: int) -> str:
        return f"{quarantine_dir(self.spec.checkpoint_root)}/{shard_id}.{stamp_ms}.json"

    @property
    def rejected_dir(self) -> str:
        return rejected_dir(self.spec.sink_root)

    def rejected_path(self, shard_id: str) -> str:
        return rejected_path(self.spec.sink_root, shard_id)

    def rejected_files(self) -> list[str]:
        """Names of the rejected-row files in the sink: one listing."""
        return [n for n in self.sink.list_files(self.rejected_dir) if n.endswith(REJECTED_SUFFIX)]

    @property
    def plan_path(self) -> str:
        return plan_path(self.spec.checkpoint_root)

    @property
    def plan_id_path(self) -> str:
        return f"{self.spec.checkpoint_root}/{PLAN_ID_NAME}"

    @property
    def reset_path(self) -> str:
        return f"{self.spec.checkpoint_root}/{RESET_NAME}"

    @property
    def input_schema_path(self) -> str:
        """Per spec fingerprint, like the output schema: a second spec racing to plan the same
        empty sink (and refused) never replaces the input schema the first spec's shards read."""
        return f"{self.spec.checkpoint_root}/{INPUT_SCHEMA_PREFIX}{self.spec.fingerprint}.json"

    @property
    def output_schema_path(self) -> str:
        """Per spec fingerprint: a spec planned afresh over an uncommitted sink never inherits
        the output schema an earlier spec's shards recorded."""
        return f"{self.spec.checkpoint_root}/{OUTPUT_SCHEMA_PREFIX}{self.spec.fingerprint}.json"

    def output_widening_path(self, column: str) -> str:
        """The type output column ``column``, recorded as null, took when a later shard held a
        value in it: one create-only file per column (named by a hash: any column name is safe)."""
        digest = hashlib.sha256(column.encode()).hexdigest()[:16]
        return f"{self.spec.checkpoint_root}/{OUTPUT_SCHEMA_PREFIX}{self.spec.fingerprint}.widened-{digest}.json"

    @property
    def manifest_path(self) -> str:
        return manifest_path(self.spec.sink_root)

    def committed_ids(self) -> set[str]:
        """Shard ids with a sentinel: one (paginated) listing of the sentinel directory."""
        return {
            name[: -len(SENTINEL_SUFFIX)]
            for name in self.checkpoint.list_files(self.sentinel_dir)
            if name.endswith(SENTINEL_SUFFIX)
        }

    def part_files(self) -> list[str]:
        """Names of the part files in the sink (ours or any run's): one listing."""
        return [name for name in self.sink.list_files(self.spec.sink_root) if is_part_name(name)]

    def staged_parts(self) -> list:
        """Parts and rejected-row files staged under the sink and never published (crashed or
        losing attempts)."""
        parts = [s for s in self.sink.list_staged(self.spec.sink_root) if is_part_name(s.final_path.rsplit("/", 1)[-1])]
        rejected = [s for s in self.sink.list_staged(self.rejected_dir) if s.final_path.endswith(REJECTED_SUFFIX)]
        return parts + rejected
