"""Split the input into shards with ids that come from content, not from position.

A shard is a contiguous range of one input file: Parquet row groups, or JSONL lines (with
the byte offsets of those lines, so a reader seeks straight to them). Its id hashes the
file's path relative to the source root, the file's version (size + mtime, or ETag) and the
range. Adding files or listing them in another order therefore never changes an existing
shard's id; editing a file in place does (and is caught as stale, see ``jobs.py``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from airflow_batch_provider.core.errors import BatchSpecError, InputDataError
from airflow_batch_provider.core.spec import FORMAT_EXTENSIONS, JobSpec
from airflow_batch_provider.core.stores import InputFile, Store
from airflow_batch_provider.core.tunables import PLAN_SCAN_BLOCK

PLAN_SCHEMA_VERSION = 1

#: What a shard's ``start``/``end`` count: the file's lines (JSONL, blank ones included), or
#: its row groups (Parquet). Written into plan.json and hashed into shard ids: never renamed.
LINES = "lines"
ROW_GROUPS = "row_groups"


@dataclass(frozen=True)
class Shard:
    """A contiguous range of one input file: ``start``/``end`` count ``unit``, from 0 (lines
    before the range and to its end, or row group indexes). Each of its rows has a position
    in the file, named by :attr:`position_name`."""

    shard_id: str
    path: str
    relpath: str
    version: str
    unit: str  # LINES (JSONL) or ROW_GROUPS (Parquet)
    start: int
    end: int
    rows: int  # planned rows (JSONL: physical lines, blank ones included)
    byte_start: int | None = None
    byte_end: int | None = None
    #: set on a re-drive unit only (``domain/redrive.py``): which shard's rejected rows it
    #: computes again, its generation and the rejected-rows file it reads and retires. Such a
    #: unit's ``shard_id`` is ``{shard}-r{n}``; never written into plan.json.
    redrive: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    @property
    def input_fingerprint(self) -> str:
        return f"{self.relpath}@{self.version}[{self.unit}:{self.start}-{self.end}]"

    @property
    def description(self) -> str:
        """The shard in words, for messages: ``<id> <file> lines 0-2000``."""
        unit = "lines" if self.unit == LINES else "row groups"
        return f"{self.shard_id} {self.relpath} {unit} {self.start}-{self.end}"

    @property
    def position_name(self) -> str:
        """What a row's position in the file is called in messages: its ``line`` (1-based,
        JSONL) or its ``row`` (0-based index in the file, Parquet)."""
        return "line" if self.unit == LINES else "row"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["redrive"] is None:
            del data["redrive"]  # plan.json stays as older providers read it
        return data

    @property
    def base_id(self) -> str:
        """The shard's id; for a re-drive unit, the id of the shard whose rejected rows it computes."""
        return self.redrive["shard_id"] if self.redrive else self.shard_id

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Shard:
        return cls(**data)


def shard_id_for(relpath: str, version: str, unit: str, start: int, end: int) -> str:
    key = json.dumps([relpath, version, unit, start, end], separators=(",", ":"))
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def make_shard(file: InputFile, unit: str, start: int, end: int, rows: int, **byte_range: int) -> Shard:
    return Shard(
        shard_id=shard_id_for(file.relpath, file.version, unit, start, end),
        path=file.path,
        relpath=file.relpath,
        version=file.version,
        unit=unit,
        start=start,
        end=end,
        rows=rows,
        **byte_range,
    )


@dataclass
class Plan:
    """Every shard of the job, persisted once as ``{checkpoint_dir}/plan.json``."""

    spec_fingerprint: str
    fingerprint_inputs: dict[str, Any]
    rows_per_shard: int
    source: str
    inputs: list[InputFile]
    shards: list[Shard]
    schema_version: int = PLAN_SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    #: the job's input schema (``arrow_types.schema_to_json``), settled at plan time
    input_schema: dict[str, Any] | None = None
    #: each input file's own schema, by relative path: reused while the file is unchanged
    file_schemas: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def plan_id(self) -> str:
        """Names this plan's set of shards: a commit made under another id checks that its
        shard is still planned (``commit.plan_still_has``)."""
        ids = sorted(s.shard_id for s in self.shards)
        return hashlib.sha256(json.dumps([self.spec_fingerprint, ids]).encode()).hexdigest()[:20]

    def to_json(self) -> bytes:
        data = asdict(self)
        data["shards"] = [s.to_dict() for s in self.shards]
        return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Plan:
        try:
            data = json.loads(raw)
            if data.get("schema_version") != PLAN_SCHEMA_VERSION:
                raise ValueError(f"unknown plan schema_version {data.get('schema_version')!r}")
            data["inputs"] = [InputFile(**f) for f in data["inputs"]]
            data["shards"] = [Shard(**s) for s in data["shards"]]
            return cls(**data)
        except (ValueError, TypeError, KeyError) as err:
            raise InputDataError(
                f"{where}: the persisted plan cannot be read ({err}). Delete it to plan again "
                "(committed shards keep their ids if the input is unchanged)."
            ) from None


# -- listing ------------------------------------------------------------------------------
def list_inputs(store: Store, spec: JobSpec) -> list[InputFile]:
    """The source's input files, sorted by relative path (see :func:`find_inputs`)."""
    return find_inputs(store, spec)[0]


def find_inputs(store: Store, spec: JobSpec) -> tuple[list[InputFile], list[InputFile]]:
    """(the source's input files sorted by relative path, the files skipped as hidden).
    Fails loudly when there are none.

    Hidden paths (a part below the source starting with ``_`` or ``.``) are skipped, as
    Spark, Hive and pyarrow skip them: ``_SUCCESS``, ``_staging/``, ``.crc`` files and a sink
    or checkpoint directory under the source are never read back as input. What the source
    names itself is read: a hidden file or directory given as the source, or a glob part that
    starts with ``_`` or ``.``. The skipped files are returned so the plan can say so."""
    extensions = FORMAT_EXTENSIONS[spec.source_format]
    found = store.find_inputs(spec.source, extensions)
    if found is None:
        raise BatchSpecError(f"source={spec.source!r} does not exist (no file, directory or glob match there)")
    named = _named_parts(spec.source)
    direct = len(found) == 1 and found[0].path.rstrip("/") == spec.source.rstrip("/")
    files, hidden = [], []
    for file in found:
        skip = not direct and any(_is_hidden(part) and not _asked_for(part, named) for part in file.relpath.split("/"))
        (hidden if skip else files).append(file)
    hidden.sort(key=lambda f: f.relpath)
    if not files:
        skipped = (
            f"; {len(hidden)} file(s) under a path part starting with '_' or '.' were skipped, e.g. "
            f"{hidden[0].path}: point source at them directly to read them"
            if hidden else "; check the path or set source_format"
        )
        raise BatchSpecError(
            f"source={spec.source!r} matched no {spec.source_format} input files "
            f"(looked for {', '.join(extensions)} files){skipped}"
        )
    return sorted(files, key=lambda f: f.relpath), hidden


def hidden_inputs_note(hidden: list[InputFile]) -> str:
    """The plan's note on the files :func:`find_inputs` skipped as hidden."""
    return (
        f"skipped {len(hidden)} input file(s) under a path part starting with '_' or '.' (as Spark, Hive and pyarrow "
        f"do: _SUCCESS, _staging/ and .crc files live there), e.g. {hidden[0].path}; to read them, point source at "
        "such a file or directory (or a glob that names the part, e.g. '_staging/*.jsonl')"
    )


def _is_hidden(part: str) -> bool:
    return part.startswith(("_", "."))


def _named_parts(source: str) -> list[str]:
    """The glob's pattern parts that ask for hidden names themselves (``_*``, ``.tmp``)."""
    if not any(ch in source for ch in "*?["):
        return []
    return [part for part in source.split("/") if _is_hidden(part)]


def _asked_for(part: str, named: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(part, pattern) for pattern in named)


# -- splitting ----------------------------------------------------------------------------
def split_file(store: Store, spec: JobSpec, file: InputFile, footers: dict[str, Any] | None = None) -> list[Shard]:
    """The file's shards; a Parquet file's Arrow schema goes into ``footers`` (by relative
    path) when given, so that settling the job's schema does not read the footer again."""
    if spec.source_format == "parquet":
        return _split_parquet(store, spec, file, footers)
    return _split_jsonl(store, spec, file)


def _split_parquet(store: Store, spec: JobSpec, file: InputFile, footers: dict[str, Any] | None = None) -> list[Shard]:
    try:
        with store.open_read(file.path, size=file.size) as handle:
            metadata = pq.ParquetFile(handle).metadata
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError flavours
        raise InputDataError(f"{file.path}: not a readable Parquet file ({err})") from None
    if footers is not None:
        footers[file.relpath] = metadata.schema.to_arrow_schema()
    shards: list[Shard] = []
    group_start, rows = 0, 0
    for index in range(metadata.num_row_groups):
        group_rows = metadata.row_group(index).num_rows
        if rows and rows + group_rows > spec.rows_per_shard:
            shards.append(make_shard(file, ROW_GROUPS, group_start, index, rows))
            group_start, rows = index, 0
        rows += group_rows
    if rows or not shards and metadata.num_row_groups:
        shards.append(make_shard(file, ROW_GROUPS, group_start, metadata.num_row_groups, rows))
    return shards


def _split_jsonl(store: Store, spec: JobSpec, file: InputFile) -> list[Shard]:
    """One pass over the bytes, noting the offset of every ``rows_per_shard``-th line."""
    every = spec.rows_per_shard
    boundaries = [(0, 0)]  # (lines before, byte offset) where each shard starts
    lines = offset = 0
    last_byte = b"\n"
    with store.open_read(file.path, size=file.size) as handle:
        while block := handle.read(PLAN_SCAN_BLOCK):
            newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 0x0A)
            # after newline k of this block, lines + k + 1 lines are complete
            for k in range((-lines - 1) % every, len(newlines), every):
                boundaries.append((lines + k + 1, offset + int(newlines[k]) + 1))
            lines += len(newlines)
            offset += len(block)
            last_byte = block[-1:]
    if last_byte != b"\n":
        lines += 1  # a last line without a newline is still a row
    boundaries.append((lines, offset))
    return [
        make_shard(file, LINES, start, end, end - start, byte_start=byte, byte_end=end_byte)
        for (start, byte), (end, end_byte) in pairwise(boundaries)
        if end > start
    ]
