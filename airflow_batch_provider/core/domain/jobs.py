"""Job-level steps around the shards: plan (with resume), reset, and finalize.

``plan_job`` lists the input once, reuses the persisted plan for files that did not change,
and returns the shards that are not committed yet. ``finalize_job`` proves that every shard of
the plan is committed and writes the ``_SUCCESS`` manifest.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from airflow_batch_provider.core import failpoints
from airflow_batch_provider.core.counters import cost, summed
from airflow_batch_provider.core.domain import redrive
from airflow_batch_provider.core.domain.commit import check_shard, different_spec_error, remove_stale_rejected, withdraw
from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.domain.planning import LINES, Plan, Shard, find_inputs, hidden_inputs_note, split_file
from airflow_batch_provider.core.domain.retype import retype_parts
from airflow_batch_provider.core.domain.schema.arrow_types import schema_from_json, schema_to_json
from airflow_batch_provider.core.domain.schema.input import file_schemas, job_input_schema, write_input_schema
from airflow_batch_provider.core.domain.schema.output import delete_output_schema, known_output_schema
from airflow_batch_provider.core.errors import IncompleteJobError, StaleCheckpointError
from airflow_batch_provider.core.spec import JobSpec
from airflow_batch_provider.core.stores import InputFile
from airflow_batch_provider.core.tunables import FINALIZE_CHECK_THREADS, ORPHAN_GRACE_S, PLAN_SPLIT_THREADS


@dataclass
class JobPlan:
    plan: Plan
    pending: list[Shard]
    committed: int
    notes: list[str] = field(default_factory=list)
    plan_written: bool = False


def plan_job(spec: JobSpec, storage: JobStorage | None = None, *, reset_key: str | None = None) -> JobPlan:
    """List the input, reuse or write the plan, and find the shards still to compute.

    With ``resume=False`` the job's earlier output is removed first, once per ``reset_key``
    (the host's run: a retried or cleared plan task of the same run keeps what that run
    committed since). Without a key every call starts fresh."""
    storage = storage or JobStorage.for_spec(spec)
    notes: list[str] = []
    if not spec.resume:
        notes.append(reset_once(storage, reset_key))
    elif read_reset_state(storage)["resetting"]:
        # A resume=False reset cut short, then resumed: keep what it left (finalize refuses
        # a sink marked as being reset).
        _write_reset_state(storage, {**read_reset_state(storage), "generation": uuid.uuid4().hex, "resetting": False})
        notes.append("a resume=False reset of this sink was cut short; resume=True keeps what it left and computes the rest")
    files, hidden = find_inputs(storage.source, spec)
    if hidden:
        notes.append(hidden_inputs_note(hidden))
    for _ in range(2):
        job = _plan_once(storage, files, notes)
        if job is not None:
            if spec.redrive_rejected is True:
                pending = {s.shard_id for s in job.pending}
                units, redrive_notes = redrive.plan_units(storage, job.plan.shards, storage.committed_ids() - pending)
                job.pending += units
                job.notes += redrive_notes
            return job
    raise StaleCheckpointError(f"{storage.plan_path} keeps changing under this planner (several runs are planning this sink at once); retry the plan task")


def _plan_once(storage: JobStorage, files: list, notes: list[str]) -> JobPlan | None:
    """One planning pass; None when another planner created the plan first (plan again)."""
    spec = storage.spec
    committed = storage.committed_ids()
    existing = storage.read_plan()
    if existing is None and committed:
        _check_sample_sentinel(storage, sorted(committed)[0])
    if existing is not None and committed:
        _check_same_spec(storage, existing)
    elif existing is not None and existing.spec_fingerprint != spec.fingerprint:
        raise different_spec_error(
            spec, existing.fingerprint_inputs,
            f"{storage.plan_path} is the plan of a run that has committed nothing yet (it may be running now) and has",
        )
    elif existing is not None and existing.rows_per_shard != spec.rows_per_shard:
        existing = None  # nothing committed under the old plan: plan afresh (its late commits are withdrawn)

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
    footers: dict[str, Any] = {}  # Parquet schemas read while splitting

    def shards_of(file: InputFile) -> list[Shard]:
        old = reusable.get(file.relpath)
        if old is not None and old.version == file.version and file.relpath in old_shards:
            return old_shards[file.relpath]
        return split_file(storage.source, spec, file, footers)

    # Files are split side by side: on object stores each is a round trip or more.
    with ThreadPoolExecutor(min(PLAN_SPLIT_THREADS, max(1, len(files)))) as pool:
        shards: list[Shard] = [shard for found in pool.map(shards_of, files) for shard in found]
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
    # Dataclass equality, not JSON: serialising a large plan twice is slow (docs/benchmarks.md, "Planning over many committed shards").
    plan_written = existing is None or existing != plan
    if plan_written:
        write_input_schema(storage, plan.input_schema or {})  # before the plan: a shard of this plan finds it
    if existing is None and storage.read_plan() is None:
        # The first plan of a sink is created create-only: of two runs planning an empty
        # sink at once, one writes it and the other plans again against it.
        if not storage.checkpoint.create_exclusive(storage.plan_path, plan.to_json()):
            return None
    elif plan_written:
        storage.checkpoint.write_atomic(storage.plan_path, plan.to_json())
    if plan_written:
        # A crash before this write leaves the old id: commits then read the plan itself.
        storage.checkpoint.write_atomic(storage.plan_id_path, plan.plan_id.encode())
        committed = storage.committed_ids()  # after the id: a late commit of an older plan is seen here
    planned = {s.shard_id for s in shards}
    withdrawn = _withdraw_superseded(storage, committed - planned)
    if withdrawn:
        notes.append(f"withdrew {withdrawn} shard(s) committed under a superseded plan (their rows are in this plan's shards)")

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
    todo_paths = {f.relpath for f in todo}
    fresh = file_schemas(storage.source, storage.spec, todo, [s for s in shards if s.relpath in todo_paths], footers)
    found = {f.relpath: known[f.relpath] for f in files if f.relpath not in todo_paths and f.relpath in known}
    found.update({f.relpath: schema_to_json(schema) for f, schema in zip(todo, fresh, strict=True)})
    return found


def _withdraw_superseded(storage: JobStorage, shard_ids: set[str]) -> int:
    """Withdraw this job's commits of shards no plan holds any more (computed under a plan
    that was replaced before anything was committed): their rows would be read twice."""
    withdrawn = 0
    for shard_id in sorted(shard_ids):
        raw, sentinel = _read_own(storage, shard_id)
        if sentinel is not None and sentinel["spec_fingerprint"] == storage.spec.fingerprint:
            withdrawn += withdraw(storage, shard_id, raw, sentinel)
    return withdrawn


def _read_own(storage: JobStorage, shard_id: str) -> tuple[bytes, dict[str, Any] | None]:
    """A sentinel and its bytes when it is this job's (it names this sink; older sentinels,
    without ``sink``, when the checkpoint lives in the sink); else (raw, None). A sentinel of
    a newer schema raises (fails closed)."""
    raw, sentinel, _ = storage.read_sentinel(shard_id)
    if sentinel is None:
        return raw or b"", None
    sink = sentinel.get("sink")
    own = sink == storage.spec.sink_root if sink is not None else storage.spec.checkpoint_dir is None
    return raw or b"", sentinel if own else None


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
    sentinel = storage.read_sentinel(shard_id).record
    if sentinel is None:
        return  # the shard task quarantines it when it gets there
    spec = storage.spec
    if sentinel["spec_fingerprint"] != spec.fingerprint:
        raise different_spec_error(spec, sentinel.get("fingerprint_inputs", {}), f"{spec.sink_root} holds committed shards of")


def reset_once(storage: JobStorage, reset_key: str | None) -> str:
    """``resume=False``: start fresh once per ``reset_key``. Every key that ever reset this
    sink is kept (not only the last): a retried plan task of an older run, after a newer run
    has started, must not reset again and delete the newer run's shards. The key is recorded
    after the reset, so a reset cut short is done again by the retry."""
    state = read_reset_state(storage)
    if reset_key and reset_key in state["keys"]:
        return f"resume=False: this run ({reset_key}) already started fresh; keeping what it has committed since"
    note = reset_job(storage)
    if reset_key:
        state = read_reset_state(storage)
        _write_reset_state(storage, {**state, "keys": [*state["keys"], reset_key], "reset_at": time.time()})
    return note


def read_reset_state(storage: JobStorage) -> dict[str, Any]:
    """``reset.json``: the keys of every run that started fresh, the ``generation`` (a new id
    at the start of every reset) and ``resetting`` (a reset has started and not finished).
    An older file holds one ``key``; an unreadable one counts as no reset yet."""
    raw = storage.checkpoint.read_bytes(storage.reset_path)
    try:
        data = json.loads(raw) if raw is not None else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    keys = [k for k in data.get("keys") or [] if isinstance(k, str)] if isinstance(data.get("keys"), list) else []
    if isinstance(data.get("key"), str) and data["key"] not in keys:
        keys.append(data["key"])
    return {"keys": keys, "generation": data.get("generation"), "resetting": data.get("resetting") is True,
            "reset_at": data.get("reset_at")}


def _write_reset_state(storage: JobStorage, state: dict[str, Any]) -> None:
    storage.checkpoint.write_atomic(storage.reset_path, json.dumps(state).encode())


def reset_job(storage: JobStorage) -> str:
    """Delete this job's earlier output: ``_SUCCESS`` first (readers stop trusting the sink
    before anything goes), then each shard its sentinels name (staged data, part, sentinel,
    see ``withdraw``), then the plan.

    Only what this job's sentinels name is removed: a part file no sentinel names (another
    tool's), another job's sentinels in a shared ``checkpoint_dir``, and staged parts of
    attempts in flight stay. A crash half-way leaves sentinels whose part is gone (they are
    quarantined and recomputed) and is finished by the retry.
    """
    spec = storage.spec
    # A new generation, marked unfinished, before anything goes: a finalize that checked the
    # shards before this point sees the change after writing _SUCCESS and takes it back.
    state = read_reset_state(storage)
    _write_reset_state(storage, {**state, "generation": uuid.uuid4().hex, "resetting": True})
    storage.sink.delete(storage.manifest_path)
    removed = kept = 0
    for shard_id in sorted(storage.committed_ids()):
        raw, sentinel = _read_own(storage, shard_id)
        if sentinel is None:
            kept += 1
            continue
        removed += withdraw(storage, shard_id, raw, sentinel)  # its part and its rejected rows
    removed += redrive.withdraw_all(storage)  # re-drives: their parts, rejected rows, retired files
    removed_quarantined = _remove_quarantined_parts(storage)
    delete_output_schema(storage)
    storage.checkpoint.delete(storage.plan_path)
    storage.checkpoint.delete(storage.plan_id_path)
    _write_reset_state(storage, {**read_reset_state(storage), "resetting": False})
    note = f"resume=False: deleted {removed} part files and their sentinels of an earlier run of {spec.sink_root}"
    if removed_quarantined:
        note += f", and {removed_quarantined} file(s) of quarantined sentinels"
    if kept:
        note += f"; kept {kept} sentinel(s) of other sinks or unreadable ones"
    return note


def _remove_quarantined_parts(storage: JobStorage) -> int:
    """Parts (and rejected-row files) named by this job's quarantined sentinels, where no
    sentinel names them now."""
    quarantine = storage.quarantine_dir
    committed = storage.committed_ids()
    parts = set(storage.part_files())
    removed = 0
    for name in storage.checkpoint.list_files(quarantine):
        try:
            record = json.loads(storage.checkpoint.read_bytes(f"{quarantine}/{name}") or b"{}")
            sentinel = json.loads(record.get("sentinel") or "{}")
        except (ValueError, AttributeError):
            continue
        if not isinstance(sentinel, dict) or sentinel.get("sink") != storage.spec.sink_root:
            continue
        part, shard_id = sentinel.get("part"), sentinel.get("shard_id")
        if shard_id in committed:
            continue
        if sentinel.get("rejected") and isinstance(shard_id, str):
            storage.sink.delete(storage.rejected_path(shard_id))
        if part in parts:
            storage.sink.delete(f"{storage.spec.sink_root}/{part}")
            parts.discard(part)
            removed += 1
    return removed


def finalize_job(
    spec: JobSpec,
    storage: JobStorage | None = None,
    *,
    elapsed_seconds: float | None = None,
    orphan_grace_s: float = ORPHAN_GRACE_S,
) -> dict[str, Any]:
    """Check every planned shard is committed and its part in place; write ``_SUCCESS``.

    Staged leftovers of this plan's shards are aborted once idle for ``orphan_grace_s``: an
    attempt of another run still streaming its part keeps writing (and then loses the race
    and aborts its own). Staged parts of other plans or writers are ``gc``'s business."""
    storage = storage or JobStorage.for_spec(spec)
    reset = read_reset_state(storage)
    if reset["resetting"]:
        raise IncompleteJobError(_resetting_message(spec))
    plan = storage.read_plan()
    if plan is None:
        raise IncompleteJobError(f"{storage.plan_path} is missing: run the plan step first")
    committed = storage.committed_ids()
    missing = [s for s in plan.shards if s.shard_id not in committed]
    if missing:
        raise IncompleteJobError(_incomplete_message(spec, missing, "have no sentinel"))
    with ThreadPoolExecutor(FINALIZE_CHECK_THREADS) as pool:
        checks = list(pool.map(lambda s: check_shard(storage, s), plan.shards))
    broken = [s for s, c in zip(plan.shards, checks, strict=True) if not c.committed]
    if broken:
        raise IncompleteJobError(_incomplete_message(spec, broken, "failed validation and were quarantined"))
    short = [
        s for s, c in zip(plan.shards, checks, strict=True)
        if (c.sentinel or {}).get("lines" if s.unit == LINES else "rows_in") != s.rows
    ]
    if short:
        raise IncompleteJobError(_incomplete_message(spec, short, "read a different number of rows than planned"))
    # Re-drives of rejected rows: stale ones withdrawn, committed ones rolled forward.
    chains = redrive.settle_all(storage, plan.shards, [c.sentinel or {} for c in checks])
    links = [link for chain in chains for link in chain.links]
    expected = {storage.part_name(s.shard_id) for s in plan.shards} | {link["part"] for link in links if link.get("part")}
    strays = sorted(n for n in storage.part_files() if n not in expected)
    if strays:
        raise IncompleteJobError(
            f"{spec.sink_root} holds {len(strays)} part files that no shard of this plan committed "
            f"(e.g. {strays[:3]}); readers would see their rows too. Move them away (resume=False removes only parts that "
            "this job's sentinels name, never files it did not write)."
        )
    rejected_names = {storage.rejected_path(s.shard_id).rsplit("/", 1)[-1] for s in plan.shards}
    rejected_names |= {redrive.rejected_name(link["shard_id"]) for link in links}
    _abort_idle_staged(storage, expected | rejected_names, orphan_grace_s)
    _remove_stale_rejected(storage, plan.shards, checks)
    # Parts committed with a column as type null that a later shard typed: re-typed (the
    # model is not called), so every part has the schema _SUCCESS records.
    sentinels = retype_parts(storage, plan.shards, [c.sentinel or {} for c in checks])
    retired = {name for chain in chains for name in chain.retired}
    commits = [*sentinels, *links]  # every commit record: a shard's or a re-drive's
    failpoints.hit("finalize_before_manifest")
    output_schema = known_output_schema(storage)
    manifest = {
        "spec_fingerprint": spec.fingerprint,
        "fingerprint_inputs": spec.fingerprint_inputs(),
        "source": spec.source,
        "sink": spec.sink_root,
        "finalized_at": time.time(),
        "shards": len(plan.shards),
        # rows_in: the input's rows (a re-drive reads no new ones); rows_out: every part's;
        # rows_rejected: the rows still rejected (each chain's tip), not those a re-drive retired
        "rows_in": sum(s.get("rows_in", 0) for s in sentinels),
        "rows_out": sum(s.get("rows_out", 0) for s in commits),
        "rows_rejected": sum(s.get("rows_rejected", 0) for s in commits if _rejected_name(s) not in retired),
        "rows_redriven": sum(link.get("rows_in", 0) for link in links),
        "redrives": len(links),
        "rejected_dir": storage.rejected_dir,
        "bytes": sum(s.get("bytes", 0) for s in commits),
        "input_schema": plan.input_schema,
        "schema": schema_to_json(output_schema) if output_schema is not None else None,
        "parts": [
            {
                "part": s["part"],
                "shard_id": s["shard_id"],
                "rows_in": s["rows_in"],
                "rows_out": s["rows_out"],
                "rows_rejected": s.get("rows_rejected", 0),
                "rejected": (s.get("rejected") or {}).get("name"),
                "bytes": s["bytes"],
                "sha256": s["sha256"],
                "input_fingerprint": s["input_fingerprint"],
                "committed_at": s.get("committed_at"),
                "counters": s.get("counters") or {},
                # additive: only where a re-drive is involved
                **({"rejected_retired": True} if _rejected_name(s) in retired else {}),
                **({"redrive_of": s["redrive_of"], "generation": s.get("generation")} if s.get("redrive_of") else {}),
            }
            for s in commits  # a shard that wrote no rows has no part: "part" is null
        ],
        # every commit's counters added up, re-drives too (a sentinel from before counters adds nothing)
        "counters": summed(s.get("counters") for s in commits),
    }
    if spec.gpu_hour_price is not None:
        manifest["gpu_hour_price"] = spec.gpu_hour_price
        manifest["cost"] = cost(manifest["counters"], spec.gpu_hour_price)
    if elapsed_seconds is not None:
        manifest["elapsed_seconds"] = elapsed_seconds
    data = json.dumps(manifest, indent=1).encode()
    storage.sink.write_atomic(storage.manifest_path, data)
    # A reset (resume=False of a newer run) that began after the checks above may have
    # deleted parts this manifest names: take it back. One that begins after this read
    # deletes _SUCCESS itself, after marking its generation.
    after = read_reset_state(storage)
    if after["generation"] != reset["generation"] or after["resetting"]:
        storage.sink.remove_if_unchanged(storage.manifest_path, data)
        raise IncompleteJobError(
            f"{spec.sink_root} was reset (resume=False, by another run) while this run finalized: its parts are "
            "being deleted, so no _SUCCESS was left. The run that reset the sink computes it again; "
            "rerun this one (from its plan task) only if its own output is wanted."
        )
    return manifest


def _rejected_name(commit: dict[str, Any]) -> str | None:
    return (commit.get("rejected") or {}).get("name")


def _resetting_message(spec: JobSpec) -> str:
    return (
        f"{spec.sink_root} is being reset (resume=False): a newer run started fresh and is deleting this job's "
        "parts, or such a reset was cut short. No _SUCCESS is written over it. Let that run finish (a reset cut "
        "short is finished by rerunning its plan task; a plan with resume=True keeps what it left)."
    )


def _remove_stale_rejected(storage: JobStorage, shards: list[Shard], checks: list) -> int:
    """Delete rejected-row files of shards whose sentinel says they rejected nothing (left by
    an earlier commit, quarantined since, when the commit that replaced it was cut short before
    its last step): one listing; the sentinel is what counts."""
    clean = {
        storage.rejected_path(s.shard_id).rsplit("/", 1)[-1]: s.shard_id
        for s, c in zip(shards, checks, strict=True) if not (c.sentinel or {}).get("rejected")
    }
    stale = [clean[name] for name in storage.rejected_files() if name in clean]
    for shard_id in stale:
        remove_stale_rejected(storage, shard_id)
    return len(stale)


def _abort_idle_staged(storage: JobStorage, part_names: set[str], grace_s: float) -> int:
    """Abort staged files (parts, rejected rows) of these names idle longer than ``grace_s``
    (crashed or losing attempts); one written to within the grace period may be a live attempt."""
    cutoff = time.time() - grace_s
    aborted = 0
    for staged in storage.staged_parts():
        if staged.final_path.rsplit("/", 1)[-1] not in part_names:
            continue
        last = staged.last_activity()
        if last is not None and last <= cutoff:
            staged.abort()
            aborted += 1
    return aborted


def _incomplete_message(spec: JobSpec, shards: list[Shard], what: str) -> str:
    shown = ", ".join(s.description for s in shards[:5])
    more = f" and {len(shards) - 5} more" if len(shards) > 5 else ""
    return (
        f"{len(shards)} shard(s) of {spec.sink_root} {what}: {shown}{more}. Clear the failed shard "
        "tasks (or trigger a new run): only those shards are computed again."
    )

