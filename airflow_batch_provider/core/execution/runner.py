"""Run one shard end to end, in-process: check, read, predict, write, commit.

This is what a Ray model replica executes (``core/ray/replica.py``), and what tests and
benchmarks call directly. The predictor is built once per runner and reused for every shard it runs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable

import pyarrow as pa

from airflow_batch_provider.core import counters, failpoints
from airflow_batch_provider.core.domain.commit import check_shard, commit_shard
from airflow_batch_provider.core.domain.layout import JobStorage, redrive_id
from airflow_batch_provider.core.domain.planning import Shard
from airflow_batch_provider.core.domain.redrive import check_unit, commit_unit, read_chain, read_records
from airflow_batch_provider.core.domain.results import ShardResult
from airflow_batch_provider.core.domain.schema.input import load_input_schema
from airflow_batch_provider.core.domain.schema.output import has_open_columns, known_output_schema, record_output_schema, widen_output_schema
from airflow_batch_provider.core.errors import PredictorFailedError, PredictorOutputError, PredictorUnavailableError, RowsFailed, StaleCheckpointError
from airflow_batch_provider.core.execution.badrows import BadRows
from airflow_batch_provider.core.execution.batches import build_predictor, from_batch, to_batch
from airflow_batch_provider.core.execution.readers import Batch, ReadStats, read_shard
from airflow_batch_provider.core.execution.redrive_rows import redrive_batches
from airflow_batch_provider.core.execution.threads import BackgroundWriter, prefetch
from airflow_batch_provider.core.execution.writers import OutputSchemaWidened, PartWriter
from airflow_batch_provider.core.redaction import Redactor
from airflow_batch_provider.core.spec import JobSpec

log = logging.getLogger(__name__)


class ShardRunner:
    """Holds a loaded predictor and runs shards of one spec with it."""

    def __init__(
        self,
        spec: JobSpec,
        storage_options: dict[str, Any] | None = None,
        predictor: Callable[[Any], Any] | None = None,
        secrets: dict[str, str] | None = None,
    ):
        self.spec = spec
        self.storage = JobStorage.for_spec(spec, storage_options)
        started = time.perf_counter()
        #: the secret values: taken out of every error this runner writes or raises
        self.redactor = Redactor((secrets or {}).values())
        try:
            self.predictor = predictor or build_predictor(spec.predictor, {**spec.predictor_kwargs, **(secrets or {})})
        except Exception as err:
            if self.redactor.names_a_secret(err):
                raise self.redactor.error(err) from None
            raise
        self.load_seconds = time.perf_counter() - started
        # A predictor that reads files the rows name (images on S3) reads them with the job's
        # credentials: they come with each run, never in predictor_kwargs (Ray keeps those).
        use_storage = getattr(self.predictor, "use_storage_options", None)
        if callable(use_storage):
            use_storage(storage_options)
        self._output_schema: pa.Schema | None = None  # create-only once recorded: kept once seen

    def run(self, shard: Shard, attempt: dict[str, Any], on_rows: Callable[[int], None] | None = None) -> ShardResult:
        """Check, compute and commit ``shard``; ``on_rows(n)`` hears of every batch the model
        has done (``n`` rows of the shard so far), for progress reports. An error that names
        a secret value is raised with the value replaced by ``***``."""
        try:
            return self._run(shard, attempt, on_rows)
        except Exception as err:
            if not self.redactor.names_a_secret(err):
                raise
            raise self.redactor.error(err) from None

    def _run(self, shard: Shard, attempt: dict[str, Any], on_rows: Callable[[int], None] | None) -> ShardResult:
        started = time.perf_counter()
        if shard.redrive:
            return self._run_redrive(shard, attempt, on_rows, started)
        check = check_shard(self.storage, shard)
        if check.committed:
            return ShardResult.skipped(shard.shard_id, check.sentinel, time.perf_counter() - started, note="already committed")
        storage = self.storage
        input_schema = load_input_schema(storage)
        while True:
            try:
                staged, part, stats, bad, rejected, model_seconds, reported = self._write_part(shard, input_schema, on_rows)
                break
            except OutputSchemaWidened as widened:
                # A column this part wrote as type null after a row group took a type: write the
                # (uncommitted) shard again with it, rather than commit a part that cannot hold it.
                log.info("shard %s: %s; writing the shard again with the widened schema", shard.shard_id, widened)
                self._output_schema = None
        figures = self._figures(reported, model_seconds, started)
        won, sentinel = commit_shard(
            storage, shard, staged if part.rows else None, rows_in=stats.rows + bad.count_unread, rows_out=part.rows,
            lines=stats.lines, attempt=attempt, rejected=rejected, rows_rejected=bad.count, null_columns=part.null_columns,
            counters=figures,
        )
        failpoints.hit("after_publish")
        if won and storage.checkpoint.size(storage.redrive_sentinel_path(redrive_id(shard.shard_id, 1))) is not None:
            # An earlier, quarantined commit of this shard was re-driven: those re-drives are
            # stale unless this commit rejected the very same rows (its rows are all here), so
            # they go at once, not at finalize. One small request per commit finds out.
            read_chain(storage, shard.shard_id, sentinel)
        return ShardResult(
            shard.shard_id,
            "computed" if won else "lost_race",
            sentinel["rows_in"],
            sentinel["rows_out"],
            sentinel["bytes"],
            sentinel.get("rows_rejected", 0),
            time.perf_counter() - started,
            model_seconds,
            note=check.note,
            counters=dict(sentinel.get("counters") or {}),
        )

    def _run_redrive(self, unit: Shard, attempt: dict[str, Any], on_rows: Callable[[int], None] | None, started: float) -> ShardResult:
        """A re-drive unit (``domain/redrive.py``): the rows of the rejected file it retires,
        computed and committed as a shard's are."""
        check = check_unit(self.storage, unit)
        if check.committed:
            return ShardResult.skipped(unit.shard_id, check.sentinel, time.perf_counter() - started, note="already committed")
        try:
            records = read_records(self.storage, unit.redrive["retires"]["name"], unit.redrive["retires"])
        except StaleCheckpointError:
            check = check_unit(self.storage, unit)  # another run's attempt committed it (and retired the file) meanwhile
            if check.committed:
                return ShardResult.skipped(unit.shard_id, check.sentinel, time.perf_counter() - started, note="committed by another run")
            raise
        input_schema = load_input_schema(self.storage)
        while True:
            try:
                staged, part, _, bad, rejected, model_seconds, reported = self._write_part(unit, input_schema, on_rows, records)
                break
            except OutputSchemaWidened as widened:
                log.info("re-drive %s: %s; writing it again with the widened schema", unit.shard_id, widened)
                self._output_schema = None
        won, sentinel = commit_unit(
            self.storage, unit, staged if part.rows else None, rows_in=len(records), rows_out=part.rows,
            attempt=attempt, rejected=rejected, rows_rejected=bad.count, null_columns=part.null_columns,
            counters=self._figures(reported, model_seconds, started),
        )
        return ShardResult(
            unit.shard_id, "computed" if won else "lost_race", sentinel["rows_in"], sentinel["rows_out"], sentinel["bytes"],
            sentinel.get("rows_rejected", 0), time.perf_counter() - started, model_seconds, note=check.note,
            counters=dict(sentinel.get("counters") or {}),
        )

    def _figures(self, reported: dict[str, Any], model_seconds: float, started: float) -> dict[str, Any]:
        """The predictor's counters and the runner's own: the replica's seconds on the unit up
        to its commit, the model's, and GPU-seconds (replica seconds x the spec's GPUs)."""
        replica_seconds = time.perf_counter() - started
        return {
            **reported,
            counters.REPLICA_SECONDS: replica_seconds,
            counters.MODEL_SECONDS: model_seconds,
            counters.GPU_SECONDS: replica_seconds * float(self.spec.num_gpus or 0),
        }

    def _write_part(self, shard: Shard, input_schema: pa.Schema, on_rows: Callable[[int], None] | None,
                    records: list[dict[str, Any]] | None = None) -> tuple:
        """Read, predict and write ``shard`` into a staged part: (staged, part writer, read
        stats, bad rows, staged rejected rows, model seconds, the predictor's counters).
        Nothing is committed yet. The counters are this write's: a shard written again (its
        schema widened) counts its last write, as its model seconds do. ``records``: a re-drive
        unit's rejected records, whose rows are computed instead."""
        spec, storage = self.spec, self.storage
        staged = storage.sink.open_staged(storage.part_path(shard.shard_id))
        stats = ReadStats()
        bad = BadRows(storage, shard, self.redactor)
        model_seconds = 0.0
        writer = part = None
        try:
            if self._output_schema is None or has_open_columns(self._output_schema):
                self._output_schema = known_output_schema(storage)  # a column of type null may have widened
            part = PartWriter(
                staged.stream, spec.sink_format, self._output_schema,
                settle=lambda schema: record_output_schema(storage, schema, input_schema),
                widen=lambda seen: widen_output_schema(storage, known_output_schema(storage) or seen, seen, input_schema),
            )
            writer = BackgroundWriter(lambda item: part.write(*item))
            rows_done = 0
            batches = (
                read_shard(storage.source, spec, shard, stats, input_schema, bad) if records is None
                else redrive_batches(records, input_schema, shard, spec.batch_size, bad)
            )
            with counters.collecting() as tally:
                for index, batch in enumerate(prefetch(batches)):
                    tick = time.perf_counter()
                    outputs = self._predict(batch, shard, bad)
                    if tally.problem:
                        raise PredictorOutputError(f"{tally.problem} (shard {shard.shard_id}, {shard.path} {batch.where(shard)})")
                    for output in outputs:
                        writer.submit((output, batch.origin(shard)))
                    model_seconds += time.perf_counter() - tick
                    rows_done += batch.table.num_rows
                    if on_rows is not None:
                        on_rows(rows_done)
                    if index == 0:
                        failpoints.hit("mid_part")
            writer.close()
            part.close()
            self._output_schema = part.schema
            if part.rows:
                staged.finish()
            else:
                staged.abort()  # no rows out: no part, so no reader ever sees a part without columns
            rejected = bad.finish()
        except BaseException:
            if writer is not None:
                with contextlib.suppress(BaseException):
                    writer.close()  # its thread ends (it holds the error raised here)
            if part is not None:
                part.discard()
            staged.abort()
            bad.abort()
            raise
        return staged, part, stats, bad, rejected, model_seconds, tally.totals()

    def _predict(self, batch: Batch, shard: Shard, bad: BadRows) -> list[Any]:
        """The predictor's output tables for ``batch``. When it raises: under
        ``bad_rows="fail"`` a :class:`PredictorFailedError` naming the shard, file and lines;
        under ``"skip"`` the batch is split in halves until the rows it raises on stand alone,
        and those are rejected (a batch of n rows with one bad row costs about 2*log2(n) calls).
        Two exceptions are not split: :class:`RowsFailed` names its failed rows itself (they go
        to the policy, its output for the others is kept), and :class:`PredictorUnavailableError`
        (no row at fault) fails the shard under both policies."""
        fmt = self.spec.batch_format
        given = to_batch(batch.table, fmt)
        try:
            output = self.predictor(given)
        except RowsFailed as failed:
            return self._rows_failed(failed, batch, shard, bad)
        except PredictorUnavailableError as err:
            raise PredictorUnavailableError(self.redactor.text(
                f"{err} (shard {shard.shard_id}, {shard.path} {batch.where(shard)})"
            )) from None
        except Exception as err:
            error = PredictorFailedError(self.redactor.text(
                f"the predictor raised {type(err).__name__}: {err} on shard {shard.shard_id}, {shard.path} "
                f"{batch.where(shard)}"
            ))
            if self.spec.bad_rows == "fail":
                raise error from (None if self.redactor.names_a_secret(err) else err)
            rows = batch.table.num_rows
            if rows <= 1:
                if rows:
                    bad.reject(error, int(batch.positions[0]), row=batch.table.to_pylist()[0], stage="predict")
                return []
        else:
            return [from_batch(output, fmt)]
        half = rows // 2
        return self._predict(batch.slice(0, half), shard, bad) + self._predict(batch.slice(half, rows), shard, bad)

    def _rows_failed(self, failed: RowsFailed, batch: Batch, shard: Shard, bad: BadRows) -> list[Any]:
        """The rows ``failed`` names go to the bad-row policy, each with its own error; the
        output it carries for the other rows is written (nothing is computed again)."""
        rows = batch.table.num_rows
        outside = [i for i in failed.errors if not 0 <= i < rows]
        if outside:
            raise PredictorOutputError(
                f"the predictor raised RowsFailed naming row(s) {outside[:5]} of a batch of {rows} rows; "
                "name rows by their 0-based index in the batch it was given"
            )
        name = shard.position_name
        for index in sorted(failed.errors):
            position = int(batch.positions[index])
            error = PredictorFailedError(self.redactor.text(
                f"the predictor failed on shard {shard.shard_id}, {shard.path} {name} {position}: {failed.errors[index]}"
                + (f" ({len(failed.errors)} row(s) of this batch failed)" if len(failed.errors) > 1 else "")
            ))
            bad.reject(error, position, row=batch.table.slice(index, 1).to_pylist()[0], stage="predict")
        if failed.output is None:
            return []
        return [from_batch(failed.output, self.spec.batch_format)]
