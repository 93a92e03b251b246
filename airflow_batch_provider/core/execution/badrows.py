"""The bad-row policy of one shard: fail at the first bad row, or reject it into ``_rejected/``.

A bad row is one that cannot be read (malformed JSON, invalid UTF-8, a value that cannot take
the job's type) or that makes the predictor raise. Every such row is reported here with the
error that names it, so a shard says the same thing under both policies: ``bad_rows="fail"``
raises that error; ``bad_rows="skip"`` appends one JSON line to the shard's staged
``{sink}/_rejected/{shard_id}.jsonl`` (file, line or row index, error, and the row verbatim)
and fails only once the shard has rejected more than ``max_bad_rows``. The staged file is
published with the shard's commit (``core/domain/commit.py``), never before.
"""

from __future__ import annotations

import base64
import json
import threading
from typing import Any

from airflow_batch_provider.core.domain.layout import JobStorage
from airflow_batch_provider.core.domain.planning import LINES, Shard
from airflow_batch_provider.core.errors import BadRowLimitError, BatchError, InputDataError
from airflow_batch_provider.core.execution.writers import jsonable
from airflow_batch_provider.core.redaction import Redactor
from airflow_batch_provider.core.stores import StagedPart
from airflow_batch_provider.core.tunables import BAD_ROWS_SHOWN


class BadRows:
    """Collects a shard's rejected rows in a staged file (opened at the first one).

    Thread-safe: the reader thread rejects unreadable rows while the predictor's thread
    rejects the rows it raised on."""

    def __init__(self, storage: JobStorage, shard: Shard, redactor: Redactor | None = None):
        self._storage = storage
        self._shard = shard
        self._redactor = redactor or Redactor()  # secret values never reach the sink
        # a re-drive rejects at most the rows it was given, all rejected before: no limit
        self.limit = None if shard.redrive else storage.spec.bad_row_limit(shard.rows)
        self.count = 0
        self.count_unread = 0  # rejected before reaching the predictor (not in the reader's row count)
        self.staged: StagedPart | None = None
        self._first: list[str] = []
        self._lock = threading.Lock()
        #: whether bad rows are rejected (else the first one fails the shard)
        self.skipping = storage.spec.bad_rows == "skip"
        #: the rejected record's key for a row's position: its line (JSONL) or row index (Parquet)
        self.position_key = "line" if shard.unit == LINES else "row_index"

    def reject(
        self, error: BatchError, position: int, *, raw: bytes | None = None, row: dict[str, Any] | None = None, stage: str = "read"
    ) -> None:
        """Record one bad row (or raise ``error`` under ``bad_rows="fail"``).

        ``raw`` is the input line as it was in the file; ``row`` the values as read, when the
        line itself is not at hand (Parquet, or a row the predictor refused). ``stage`` is
        ``"read"`` (the row never reached the predictor) or ``"predict"`` (the predictor raised)."""
        if self._storage.spec.bad_rows == "fail":
            raise error
        message = self._redactor.text(str(error))
        record: dict[str, Any] = {"file": self._shard.path, self.position_key: position, "stage": stage, "error": message}
        if raw is not None:
            try:
                record["raw"] = raw.decode("utf-8")
            except UnicodeDecodeError:
                record["raw_base64"] = base64.b64encode(raw).decode("ascii")
        if row is not None:
            record["row"] = row
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=jsonable) + "\n"
        with self._lock:
            if self.staged is None:
                self.staged = self._storage.sink.open_staged(self._storage.rejected_path(self._shard.shard_id))
            self.staged.stream.write(line.encode())
            self.count += 1
            self.count_unread += stage == "read"
            if len(self._first) < BAD_ROWS_SHOWN:
                self._first.append(f"{self.position_key.replace('_', ' ')} {position} ({message})")
            if self.limit is not None and self.count > self.limit:
                raise BadRowLimitError(self._limit_message())

    def carry(self, record: dict[str, Any]) -> None:
        """Keep a rejected record as it is in this unit's rejected rows (a re-drive's record of
        a row it does not compute again); under ``bad_rows="fail"`` it fails the unit, as the
        row still cannot be computed."""
        if self._storage.spec.bad_rows == "fail":
            where = f"{record.get('file')} {self.position_key.replace('_', ' ')} {record.get(self.position_key)}"
            raise InputDataError(
                f"{where}: rejected earlier ({record.get('error')}) and not computed again by this re-drive"
                + (f" ({record['redrive_error']})" if record.get("redrive_error") else "")
                + "; with bad_rows='fail' every re-driven row must be computed. Set bad_rows='skip' to keep it rejected."
            )
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=jsonable) + "\n"
        with self._lock:
            if self.staged is None:
                self.staged = self._storage.sink.open_staged(self._storage.rejected_path(self._shard.shard_id))
            self.staged.stream.write(line.encode())
            self.count += 1
            self.count_unread += 1

    def _limit_message(self) -> str:
        spec = self._storage.spec
        allowed = f"{spec.max_bad_rows}" if isinstance(spec.max_bad_rows, int) else (
            f"{spec.max_bad_rows} of the shard's {self._shard.rows} rows = {self.limit}"
        )
        return (
            f"{self._shard.path}: shard {self._shard.description} has more bad rows than "
            f"max_bad_rows={allowed} allows (stopped at {self.count}); the first: "
            f"{'; '.join(self._first)}. Fix the input, or raise max_bad_rows."
        )

    def finish(self) -> StagedPart | None:
        """Make the rejected rows durable (still unpublished); None when there were none."""
        if self.staged is not None:
            self.staged.finish()
        return self.staged

    def abort(self) -> None:
        if self.staged is not None:
            self.staged.abort()


class FailOnBadRow:
    """The ``bad_rows="fail"`` policy alone, for reading a shard outside a run (tests, tools)."""

    count = count_unread = 0
    skipping = False

    def reject(self, error: BatchError, position: int, **_: Any) -> None:
        raise error
