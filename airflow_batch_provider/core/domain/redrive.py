"""Re-drive: compute again the rows that committed shards rejected, once the predictor is fixed.

A shard committed under ``bad_rows="skip"`` holds its rows in its part and its rejected rows in
``_rejected/{shard}.jsonl``. A re-drive of that file is a unit of work of its own, committed
like a shard (``commit.py``), so a sink never holds a row twice and a crash at any point is
either nothing or rolled forward:

1. the rows are rebuilt from the rejected records (``execution/redrive_rows.py``), computed,
   and written to a staged ``part-{shard}-r{n}.{ext}``; rows that fail again go to a staged
   ``_rejected/{shard}-r{n}.jsonl``;
2. the sentinel ``{checkpoint}/redrive/{shard}-r{n}.json`` is created create-only: the commit
   point. It names the file it retires (``retires``: name, bytes, sha256);
3. the winner publishes the part, then its rejected rows, then *retires* the file it read:
   moves it to ``_rejected/_retired/`` (a crash in between is finished by whoever next checks
   the unit, the plan or finalize: the sentinel is what counts).

The re-drives of one shard form a chain: the shard's sentinel, then re-drive 1, 2, ... each
retiring the previous link's rejected file (by its sha256). A link whose file is not the
previous link's (the shard was recomputed since, and rejected other rows or none) is stale: it
is withdrawn (its part, rejected rows and sentinel), since the shard's new commit holds those
rows again. The *tip* of a chain holds the shard's rows still rejected; finalize counts those.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from airflow_batch_provider.core import failpoints
from airflow_batch_provider.core.domain.commit import (
    ShardCheck,
    _abort,
    _gone,
    _published_problem,
    different_spec_error,
    plan_still_has,
    sentinel_record,
)
from airflow_batch_provider.core.domain.layout import (
    REJECTED_SUFFIX,
    SENTINEL_SUFFIX,
    InvalidSentinel,
    JobStorage,
    parse_sentinel,
    redrive_id,
    split_redrive_id,
)
from airflow_batch_provider.core.domain.planning import Shard
from airflow_batch_provider.core.errors import CommitError, StaleCheckpointError
from airflow_batch_provider.core.stores import StagedPart

log = logging.getLogger(__name__)

#: the rejected records a re-drive computes again: the rows the predictor raised on. Rows that
#: could not be read are carried to the next file as they are (the input is pinned: read
#: again, the same bytes fail the same way).
REDRIVABLE_STAGE = "predict"


@dataclass
class Chain:
    """A committed shard and the valid re-drives of its rejected rows, in order."""

    shard_id: str
    base: dict[str, Any]
    links: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tip(self) -> dict[str, Any]:
        return self.links[-1] if self.links else self.base

    @property
    def retired(self) -> list[str]:
        """The rejected-row files of this chain that a later link retired."""
        records = [self.base, *self.links[:-1]] if self.links else []
        return [r["rejected"]["name"] for r in records if r.get("rejected")]


def rejected_name(unit_id: str) -> str:
    return f"{unit_id}{REJECTED_SUFFIX}"


# -- reading a chain ------------------------------------------------------------------------
def read_chain(storage: JobStorage, shard_id: str, base: dict[str, Any], listed: set[str] | None = None) -> Chain:
    """Shard ``shard_id``'s chain from its (valid) sentinel ``base``: the re-drives that each
    retire the previous link's rejected file; stale ones (of an earlier commit of the shard)
    are withdrawn. ``listed``: the re-drive sentinel names one listing found (None: list now)."""
    if listed is None:
        listed = set(storage.redrive_sentinel_files())
    chain = Chain(shard_id, base)
    generation = 1
    while f"{redrive_id(shard_id, generation)}{SENTINEL_SUFFIX}" in listed:
        unit_id = redrive_id(shard_id, generation)
        read = storage.read_redrive_sentinel(unit_id)
        link = read.record
        previous = (chain.tip.get("rejected") or {}).get("sha256")
        if link is not None and link["spec_fingerprint"] != storage.spec.fingerprint:
            raise different_spec_error(storage.spec, link.get("fingerprint_inputs", {}),
                                       f"{storage.redrive_sentinel_path(unit_id)} was committed by")
        if link is None or not previous or (link.get("retires") or {}).get("sha256") != previous:
            break
        chain.links.append(link)
        generation += 1
    stale = sorted(
        (split_redrive_id(n[: -len(SENTINEL_SUFFIX)])[1], n[: -len(SENTINEL_SUFFIX)]) for n in listed
        if split_redrive_id(n[: -len(SENTINEL_SUFFIX)])[0] == shard_id
        and split_redrive_id(n[: -len(SENTINEL_SUFFIX)])[1] >= generation
    )
    for _, unit_id in reversed(stale):  # newest first: a later link is never left without its predecessor
        withdraw_link(storage, unit_id)
    return chain


def settle(storage: JobStorage, chain: Chain) -> None:
    """Roll every link of ``chain`` forward: its part and (the tip's) rejected rows published,
    each retired file moved out of ``_rejected/``. Raises ``CommitError`` when a committed file
    can no longer be published (its staged data gone); withdraws such a link instead while the
    file it retires is still in place (its rows are still there)."""
    for link in chain.links:
        unit_id = link["shard_id"]
        problem = ""
        if link.get("part"):
            problem, _ = _published_problem(storage, storage.part_path(unit_id), link)
        record = link.get("rejected")
        if not problem and record and link is chain.tip:
            problem, _ = _published_problem(storage, storage.rejected_path(unit_id), record)
        if problem:
            if storage.sink.size(f"{storage.rejected_dir}/{link['retires']['name']}") is not None:
                withdraw_link(storage, unit_id)
                log.warning("re-drive %s: %s; withdrawn (the rows it retires are still rejected, and are planned again)", unit_id, problem)
                del chain.links[chain.links.index(link):]
                return
            raise CommitError(f"re-drive {unit_id} is committed, but {problem}. Run verify; restore the file from "
                              f"{storage.retired_dir} or start fresh (resume=False).")
        retire(storage, link["retires"]["name"])
    for name in chain.retired:  # a re-drive's own rejected file, once a later one retired it
        retire(storage, name)


def retire(storage: JobStorage, name: str) -> bool:
    """Move ``_rejected/{name}`` to ``_rejected/_retired/{name}`` (copy, then delete: a crash
    in between leaves both, and the next call finishes it). False when it is not there."""
    path = f"{storage.rejected_dir}/{name}"
    data = storage.sink.read_bytes(path)
    if data is None:
        return False
    storage.sink.write_atomic(storage.retired_path(name), data)
    storage.sink.delete(path)
    return True


def withdraw_link(storage: JobStorage, unit_id: str) -> bool:
    """Take back a stale re-drive: staged data, part, rejected rows, then its sentinel (only if
    unchanged). Its retired file is not brought back: a stale link's rows are in the shard's
    newer commit."""
    path = storage.redrive_sentinel_path(unit_id)
    raw = storage.checkpoint.read_bytes(path)
    if raw is None:
        return False
    try:
        link = json.loads(raw)
    except ValueError:
        link = {}
    rejected = link.get("rejected") or {}
    _abort(*(storage.sink.staged_from(h) for h in (link.get("staged"), rejected.get("staged")) if h))
    if link.get("part"):
        storage.sink.delete(f"{storage.sink_root}/{link['part']}")
    storage.sink.delete(storage.rejected_path(unit_id))
    return storage.checkpoint.remove_if_unchanged(path, raw)


# -- planning -------------------------------------------------------------------------------
def plan_units(storage: JobStorage, shards: list[Shard], committed: set[str]) -> tuple[list[Shard], list[str]]:
    """One re-drive unit per committed shard whose rows still rejected include rows the
    predictor raised on; (units, notes). Reads only the shards that have a rejected-rows file
    or a re-drive: one listing of ``_rejected/`` and one of the re-drive sentinels."""
    listed = set(storage.redrive_sentinel_files())
    candidates = {split_redrive_id(n[: -len(REJECTED_SUFFIX)])[0] for n in storage.rejected_files()}
    candidates |= {split_redrive_id(n[: -len(SENTINEL_SUFFIX)])[0] for n in listed}
    units, notes, unreadable = [], [], 0
    for shard in shards:
        if shard.shard_id not in candidates or shard.shard_id not in committed:
            continue
        base = storage.read_sentinel(shard.shard_id).record
        if base is None:
            continue  # quarantined on the shard's own check, and computed again
        chain = read_chain(storage, shard.shard_id, base, listed)
        settle(storage, chain)
        tip = chain.tip
        if not tip.get("rejected"):
            continue
        name = tip["rejected"]["name"]
        records = read_records(storage, name, tip["rejected"])
        redrivable = sum(1 for r in records if is_redrivable(r))
        unreadable += len(records) - redrivable
        if not redrivable:
            continue
        generation = len(chain.links) + 1
        units.append(dataclasses.replace(
            shard, shard_id=redrive_id(shard.shard_id, generation), rows=redrivable,
            redrive={"shard_id": shard.shard_id, "generation": generation,
                     "retires": {k: tip["rejected"][k] for k in ("name", "bytes", "sha256")}},
        ))
    if units:
        notes.append(f"re-drive: {sum(u.rows for u in units)} rejected row(s) of {len(units)} shard(s) are computed again")
    else:
        notes.append("re-drive: no rejected rows to compute again")
    if unreadable:
        notes.append(f"re-drive: {unreadable} rejected row(s) could not be read from the input and stay rejected "
                     "(the input is pinned: the same bytes fail the same way; see docs/redrive.md)")
    return units, notes


def is_redrivable(record: dict[str, Any]) -> bool:
    return record.get("stage") == REDRIVABLE_STAGE and isinstance(record.get("row"), dict)


def read_records(storage: JobStorage, name: str, expected: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of ``_rejected/{name}``, checked against what its commit recorded (size and
    sha256): a re-drive reads exactly the rows that were rejected."""
    path = f"{storage.rejected_dir}/{name}"
    data = storage.sink.read_bytes(path)
    if data is None:
        raise StaleCheckpointError(f"{path} is gone since it was planned for a re-drive (another run re-drove it?): plan again")
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != expected.get("bytes") or (expected.get("sha256") and digest != expected["sha256"]):
        raise StaleCheckpointError(
            f"{path} holds {len(data)} bytes (sha256 {digest[:12]}...), not what its commit recorded "
            f"({expected.get('bytes')} bytes): it was edited or replaced. Restore it, or plan again."
        )
    records = []
    for number, line in enumerate(data.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as err:
                raise StaleCheckpointError(f"{path}: line {number} is not a rejected record ({err})") from None
    return records


# -- one unit: check and commit ---------------------------------------------------------------
def check_unit(storage: JobStorage, unit: Shard) -> ShardCheck:
    """Is this re-drive committed? Rolls its commit forward (publish, retire) when it is."""
    read = storage.read_redrive_sentinel(unit.shard_id)
    if read.record is None:
        if read.invalid:
            raise CommitError(f"re-drive {unit.shard_id}: {read.invalid}. Move the sentinel away and plan again.")
        return ShardCheck(committed=False)
    link = read.record
    if link["spec_fingerprint"] != storage.spec.fingerprint:
        raise different_spec_error(storage.spec, link.get("fingerprint_inputs", {}),
                                   f"{storage.redrive_sentinel_path(unit.shard_id)} was committed by")
    base = storage.read_sentinel(unit.base_id).record or {}
    chain = read_chain(storage, unit.base_id, base) if base else Chain(unit.base_id, {})
    if link not in chain.links:
        return ShardCheck(committed=False, note=f"re-drive {unit.shard_id} is not part of its shard's current commit "
                                               "(the shard was recomputed since, or is being): its rows are the shard's again")
    settle(storage, chain)
    return ShardCheck(committed=True, sentinel=link)


def inspect_unit(storage: JobStorage, unit: Shard) -> ShardCheck:
    """:func:`check_unit` without healing, for processes that must not write (the triggerer):
    committed when its sentinel is there and its part (if any) published."""
    link = storage.read_redrive_sentinel(unit.shard_id).record
    if link is None:
        return ShardCheck(committed=False)
    if link.get("part") and storage.sink.size(storage.part_path(unit.shard_id)) != link["bytes"]:
        return ShardCheck(committed=False, note=f"re-drive {unit.shard_id} is committed but not yet published")
    return ShardCheck(committed=True, sentinel=link)


def commit_unit(
    storage: JobStorage,
    unit: Shard,
    staged: StagedPart | None,
    *,
    rows_in: int,
    rows_out: int,
    attempt: dict[str, Any],
    rejected: StagedPart | None = None,
    rows_rejected: int = 0,
    null_columns: list[str] | None = None,
    counters: dict[str, Any] | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Create the re-drive's sentinel (the commit point), then publish its part and rejected
    rows and retire the file it read. As ``commit.commit_shard``: (won, sentinel), the
    ``counters`` recorded as a shard's are."""
    redrive = unit.redrive or {}
    sentinel = {
        "redrive_of": unit.base_id,
        "generation": redrive.get("generation"),
        "retires": redrive.get("retires"),
        **sentinel_record(
            storage, unit, staged, rejected_name=rejected_name(unit.shard_id), rows_in=rows_in, rows_out=rows_out, lines=0,
            attempt=attempt, rejected=rejected, rows_rejected=rows_rejected, null_columns=null_columns, counters=counters,
        ),
    }
    failpoints.hit("redrive_before_sentinel")
    path = storage.redrive_sentinel_path(unit.shard_id)
    raw = json.dumps(sentinel, sort_keys=True).encode()
    if not storage.checkpoint.create_exclusive(path, raw):
        found = storage.checkpoint.read_bytes(path)
        try:
            winner = parse_sentinel(found or b"", path, unit.shard_id)
        except InvalidSentinel as err:
            _abort(staged, rejected)
            raise CommitError(f"re-drive {unit.shard_id}: {err}. Move it away and plan again.") from None
        if (winner.get("attempt") or {}).get("token") != attempt.get("token") or winner.get("staged") != sentinel["staged"]:
            _abort(staged, rejected)
            return False, winner
        sentinel, raw = winner, found or raw  # our own create, retried underneath
    base = Shard(**{**unit.to_dict(), "shard_id": unit.base_id, "redrive": None})
    if not plan_still_has(storage, base, attempt):
        withdraw_link(storage, unit.shard_id)
        raise CommitError(f"re-drive {unit.shard_id}: its shard is not in the plan that replaced the one it was planned "
                          "under; its commit was withdrawn")
    failpoints.hit("redrive_before_publish")
    if staged is not None and not staged.publish():
        raise _gone(unit, storage.part_path(unit.shard_id))
    if rejected is not None and not rejected.publish():
        raise _gone(unit, storage.rejected_path(unit.shard_id))
    failpoints.hit("redrive_before_retire")
    retire(storage, sentinel["retires"]["name"])
    return True, sentinel


# -- the whole sink: finalize, reset ----------------------------------------------------------
def settle_all(storage: JobStorage, shards: list[Shard], sentinels: list[dict[str, Any]]) -> list[Chain]:
    """Every shard's chain, settled (finalize): stale re-drives withdrawn, committed ones rolled
    forward. One listing when nothing was ever re-driven."""
    listed = set(storage.redrive_sentinel_files())
    if not listed:
        return [Chain(s.shard_id, sentinel) for s, sentinel in zip(shards, sentinels, strict=True)]
    chains = []
    for shard, sentinel in zip(shards, sentinels, strict=True):
        chain = read_chain(storage, shard.shard_id, sentinel, listed)
        settle(storage, chain)
        chains.append(chain)
    planned = {s.shard_id for s in shards}
    for name in listed:  # re-drives of shards no plan holds now (superseded or reset)
        if split_redrive_id(name[: -len(SENTINEL_SUFFIX)])[0] not in planned:
            withdraw_link(storage, name[: -len(SENTINEL_SUFFIX)])
    return chains


def withdraw_all(storage: JobStorage) -> int:
    """Every re-drive of this sink (a reset): sentinels, parts, rejected rows; then the retired
    files. Only re-drives that name this sink: a shared ``checkpoint_dir`` holds other jobs'."""
    removed = 0
    for name in sorted(storage.redrive_sentinel_files(), reverse=True):
        unit_id = name[: -len(SENTINEL_SUFFIX)]
        link = storage.read_redrive_sentinel(unit_id, strict=False).record
        if link is not None and link.get("sink") == storage.spec.sink_root:  # never another job's in a shared checkpoint_dir
            removed += withdraw_link(storage, unit_id)
    for name in storage.sink.list_files(storage.retired_dir):
        storage.sink.delete(storage.retired_path(name))
    return removed
