"""Job-level steps around the shards: plan (with resume), reset, and finalize.

``plan_job`` lists the input once, reuses the persisted plan for files that did not change,
and returns the shards that are not committed yet. ``finalize_job`` proves that every shard of
the plan is committed and writes the ``_SUCCESS`` manifest.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from airflow_batch_provider.core import failpoints
from airflow_batch_provider.core.domain.commit import InvalidSentinel, check_shard, different_spec_error, parse_sentinel
from airflow_batch_provider.core.domain.input_schema import file_schemas, job_input_schema
from airflow_batch_provider.core.domain.job_schema import known_output_schema, write_input_schema
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.domain.planning import Plan, Shard, list_inputs, split_file
from airflow_batch_provider.core.errors import IncompleteJobError, StaleCheckpointError
from airflow_batch_provider.core.schemas import schema_from_json, schema_to_json
from airflow_batch_provider.core.spec import BatchSpec
from airflow_batch_provider.core.stores import InputFile

_CHECK_THREADS = 16


@dataclass
class JobPlan:
    plan: Plan
    pending: list[Shard]
    committed: int
    notes: list[str] = field(default_factory=list)
    plan_written: bool = False


def load_plan(storage: JobStorage) -> Plan | None:
    raw = storage.checkpoint.read_bytes(storage.plan_path)
    return None if raw is None else Plan.from_json(raw, storage.plan_path)


def plan_job(spec: BatchSpec, storage: JobStorage | None = None) -> JobPlan:
    """List the input, reuse or write the plan, and find the shards still to compute."""
    storage = storage or JobStorage.for_spec(spec)
    notes: list[str] = []
    if not spec.resume:
        notes.append(reset_job(storage))
    files = list_inputs(storage.source, spec)
    committed = storage.committed_ids()
    existing = load_plan(storage)
    if existing is None and committed:
        _check_sample_sentinel(storage, sorted(committed)[0])
    if existing is not None and committed:
        _check_same_spec(storage, existing)
    elif existing is not None and (
        existing.spec_fingerprint != spec.fingerprint or existing.rows_per_shard != spec.rows_per_shard
    ):
        existing = None  # nothing committed under the old plan: plan afresh

    reusable = {f.relpath: f for f in existing.inputs} if existing else {}
    old_shards: dict[str, list[Shard]] = {}
    for shard in existing.shards if existing else []:
        old_shards.setdefault(shard.relpath, []).append(shard)
    current = {f.relpath: f for f in files}
    for relpath, old in reusable.items():
        new = current.get(relpath)
        if new is None or new.version != old.version:
            done = [s.shard_id for s in old_shards.get(relpath, []) if s.shard_id in committed]
            if done:
                what = "was removed" if new is None else f"changed (version {old.version} -> {new.version})"
                raise StaleCheckpointError(
                    f"input {old.path} {what} since it was planned, and {len(done)} of its shards are "
                    f"already committed in {spec.sink_root}. Restore the file, or set resume=False "
                    "(or use a new sink) to start fresh."
                )
    shards: list[Shard] = []
    footers: dict[str, Any] = {}  # Parquet schemas read while splitting
    for file in files:
        old = reusable.get(file.relpath)
        if old is not None and old.version == file.version and file.relpath in old_shards:
            shards.extend(old_shards[file.relpath])
        else:
            shards.extend(split_file(storage.source, spec, file, footers))
    schemas = _file_schemas(storage, files, shards, existing, footers)
    input_schema = job_input_schema(spec, [(f.path, schema_from_json(schemas[f.relpath])) for f in files if f.relpath in schemas])
    plan = Plan(
        spec_fingerprint=spec.fingerprint,
        fingerprint_inputs=spec.fingerprint_inputs(),
        rows_per_shard=spec.rows_per_shard,
        source=spec.source,
        inputs=files,
        shards=shards,
        input_schema=schema_to_json(input_schema),
        file_schemas=schemas,
    )
    # Dataclass equality, not JSON: serialising 10,000 shards twice costs ~0.4 s per plan.
    plan_written = existing is None or existing != plan
    if plan_written:
        write_input_schema(storage, plan.input_schema or {})  # before the plan: a shard of this plan finds it
        storage.checkpoint.write_atomic(storage.plan_path, plan.to_json())

    pending = [s for s in shards if s.shard_id not in committed]
    done = [s for s in shards if s.shard_id in committed]
    if done:
        parts = set(storage.part_files())
        for shard in done:
            if storage.part_name(shard.shard_id) not in parts:
                check = check_shard(storage, shard)  # rolls forward, or quarantines
                if not check.committed:
                    pending.append(shard)
                    notes.append(check.note)
    return JobPlan(plan, pending, len(shards) - len(pending), notes, plan_written)


def _file_schemas(
    storage: JobStorage, files: list[InputFile], shards: list[Shard], existing: Plan | None, footers: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Each file's schema, read again only for files new or changed since the last plan
    (none at all when ``input_schema`` is declared)."""
    if storage.spec.input_schema is not None:
        return {}
    known = existing.file_schemas if existing is not None else {}
    unchanged = {f.relpath for f in existing.inputs} if existing is not None else set()
    versions = {f.relpath: f.version for f in existing.inputs} if existing is not None else {}
    todo = [f for f in files if not (f.relpath in known and f.relpath in unchanged and versions[f.relpath] == f.version)]
    fresh = file_schemas(storage.source, storage.spec, todo, [s for s in shards if s.relpath in {f.relpath for f in todo}], footers)
    found = {f.relpath: known[f.relpath] for f in files if f not in todo and f.relpath in known}
    found.update({f.relpath: schema_to_json(schema) for f, schema in zip(todo, fresh, strict=True)})
    return found


def _check_same_spec(storage: JobStorage, existing: Plan) -> None:
    spec = storage.spec
    if existing.spec_fingerprint != spec.fingerprint:
        raise different_spec_error(spec, existing.fingerprint_inputs, f"{spec.sink_root} holds committed shards of")
    if existing.rows_per_shard != spec.rows_per_shard:
        raise StaleCheckpointError(
            f"rows_per_shard changed from {existing.rows_per_shard} to {spec.rows_per_shard}, but "
            f"{spec.sink_root} holds shards committed with the old layout. Set rows_per_shard="
            f"{existing.rows_per_shard} to resume, or resume=False to start fresh."
        )


def _check_sample_sentinel(storage: JobStorage, shard_id: str) -> None:
    """No plan but sentinels: make sure they belong to this spec before trusting any."""
    path = storage.sentinel_path(shard_id)
    try:
        sentinel = parse_sentinel(storage.checkpoint.read_bytes(path) or b"", path, shard_id)
    except InvalidSentinel:
        return  # the shard task quarantines it when it gets there
    spec = storage.spec
    if sentinel["spec_fingerprint"] != spec.fingerprint:
        raise different_spec_error(spec, sentinel.get("fingerprint_inputs", {}), f"{spec.sink_root} holds committed shards of")


def reset_job(storage: JobStorage) -> str:
    """Delete this job's earlier output (resume=False): our part files first, then state.

    Parts go before sentinels so that a crash half-way leaves sentinels without parts
    (quarantined and recomputed later), never parts without a plan. Files we did not write
    are left alone.
    """
    spec = storage.spec
    parts = storage.part_files()
    for name in parts:
        storage.sink.delete(f"{spec.sink_root}/{name}")
    for staged in storage.staged_parts():
        staged.abort()
    storage.sink.delete(storage.manifest_path)
    storage.checkpoint.delete(storage.output_schema_path)
    sentinels = list(storage.checkpoint.list_files(storage.sentinel_dir))
    for name in sentinels:
        storage.checkpoint.delete(f"{storage.sentinel_dir}/{name}")
    storage.checkpoint.delete(storage.plan_path)
    return f"resume=False: deleted {len(parts)} part files and {len(sentinels)} sentinels from an earlier run"


def finalize_job(spec: BatchSpec, storage: JobStorage | None = None, *, elapsed_seconds: float | None = None) -> dict[str, Any]:
    """Check every planned shard is committed and its part in place; write ``_SUCCESS``."""
    storage = storage or JobStorage.for_spec(spec)
    plan = load_plan(storage)
    if plan is None:
        raise IncompleteJobError(f"{storage.plan_path} is missing: run the plan step first")
    committed = storage.committed_ids()
    missing = [s for s in plan.shards if s.shard_id not in committed]
    if missing:
        raise IncompleteJobError(_incomplete_message(spec, missing, "have no sentinel"))
    with ThreadPoolExecutor(_CHECK_THREADS) as pool:
        checks = list(pool.map(lambda s: check_shard(storage, s), plan.shards))
    broken = [s for s, c in zip(plan.shards, checks, strict=True) if not c.committed]
    if broken:
        raise IncompleteJobError(_incomplete_message(spec, broken, "failed validation and were quarantined"))
    short = [
        s for s, c in zip(plan.shards, checks, strict=True)
        if (c.sentinel or {}).get("lines" if s.unit == "lines" else "rows_in") != s.rows
    ]
    if short:
        raise IncompleteJobError(_incomplete_message(spec, short, "read a different number of rows than planned"))
    expected = {storage.part_name(s.shard_id) for s in plan.shards}
    strays = sorted(n for n in storage.part_files() if n not in expected)
    if strays:
        raise IncompleteJobError(
            f"{spec.sink_root} holds {len(strays)} part files that no shard of this plan committed "
            f"(e.g. {strays[:3]}); readers would see their rows too. Move them away or start fresh."
        )
    for staged in storage.staged_parts():
        staged.abort()  # leftovers of crashed or losing attempts
    failpoints.hit("finalize_before_manifest")
    sentinels = [c.sentinel or {} for c in checks]
    output_schema = known_output_schema(storage)
    manifest = {
        "spec_fingerprint": spec.fingerprint,
        "fingerprint_inputs": spec.fingerprint_inputs(),
        "source": spec.source,
        "sink": spec.sink_root,
        "finalized_at": time.time(),
        "shards": len(plan.shards),
        "rows_in": sum(s.get("rows_in", 0) for s in sentinels),
        "rows_out": sum(s.get("rows_out", 0) for s in sentinels),
        "bytes": sum(s.get("bytes", 0) for s in sentinels),
        "input_schema": plan.input_schema,
        "schema": schema_to_json(output_schema) if output_schema is not None else None,
        "parts": [
            {
                "part": s["part"],
                "shard_id": s["shard_id"],
                "rows_in": s["rows_in"],
                "rows_out": s["rows_out"],
                "bytes": s["bytes"],
                "sha256": s["sha256"],
                "input_fingerprint": s["input_fingerprint"],
                "committed_at": s.get("committed_at"),
            }
            for s in sentinels  # a shard that wrote no rows has no part: "part" is null
        ],
    }
    if elapsed_seconds is not None:
        manifest["elapsed_seconds"] = elapsed_seconds
    storage.sink.write_atomic(storage.manifest_path, json.dumps(manifest, indent=1).encode())
    return manifest


def _incomplete_message(spec: BatchSpec, shards: list[Shard], what: str) -> str:
    shown = ", ".join(s.description for s in shards[:5])
    more = f" and {len(shards) - 5} more" if len(shards) > 5 else ""
    return (
        f"{len(shards)} shard(s) of {spec.sink_root} {what}: {shown}{more}. Clear the failed shard "
        "tasks (or trigger a new run): only those shards are computed again."
    )

