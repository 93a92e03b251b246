"""Errors of the core.

They derive from plain Python exceptions so the core stays free of Airflow; the Airflow
layer wraps them in :class:`airflow_batch_provider.exceptions.BatchInferenceException`.
Every message names the file, row or field at fault and says what to do.
"""

from __future__ import annotations

from typing import Any


class BatchError(Exception):
    """Base class of everything this package raises on purpose."""

    #: whether the same step, run again unchanged, can succeed (a flaky store, a lost node,
    #: a predictor's hosted endpoint) or cannot (the spec, the data or the checkpoint must
    #: change first): a host fails a step that cannot without retrying it.
    retryable = True


class BatchSpecError(BatchError, ValueError):
    """A BatchSpec field has a value we cannot run."""

    retryable = False


class InputDataError(BatchError, ValueError):
    """An input file cannot be read as the declared format (names the file and row)."""

    retryable = False


class InputEncodingError(InputDataError):
    """Text in an input file is not valid UTF-8 (names the file and the line or row)."""


class InputChangedError(InputDataError):
    """An input file is gone or holds another version than the plan recorded: the shard
    fails before its commit, and the message says how to plan the new version."""


class BadRowLimitError(InputDataError):
    """A shard rejected more rows than ``max_bad_rows`` allows (names the file and the first bad lines)."""


class PredictorError(BatchError):
    """The predictor could not be loaded, or returned something that is not a batch."""


class PredictorOutputError(PredictorError):
    """The predictor's output cannot be written: ragged, mistyped or misaligned (names the column)."""

    retryable = False


class PredictorFailedError(PredictorError):
    """The predictor raised on a batch (names the shard, the file and the batch's lines or rows)."""


class RowsFailed(PredictorError):
    """Raised by a predictor that answered some rows of a batch and failed others for good
    (a hosted model's 400 for one prompt, retries exhausted for one request).

    ``errors`` maps each failed row's 0-based index in the batch to its error message;
    ``output`` is the predictor's output for the other rows (in the spec's batch format,
    in order; ``None`` when there is none). The runner takes the output as it is and hands
    exactly the named rows to the job's ``bad_rows`` policy: ``"skip"`` rejects them into
    ``_rejected/``, ``"fail"`` fails the shard naming the first one's line or row. Unlike any
    other exception, it does not make the runner split the batch and call the predictor
    again, so no row is sent twice (a hosted model bills each call)."""

    def __init__(self, errors: dict[int, str], output: Any = None):
        if not errors:
            raise ValueError("RowsFailed needs at least one failed row (errors={index: message})")
        self.errors = {int(index): str(message) for index, message in errors.items()}
        self.output = output
        first = min(self.errors)
        super().__init__(f"{len(self.errors)} row(s) failed; row {first} of the batch: {self.errors[first]}")


class PredictorUnavailableError(PredictorError):
    """The predictor can serve no row now, and no row is at fault: its endpoint refuses
    connections, or refuses the API key. The runner fails the shard under both ``bad_rows``
    policies without splitting the batch (so a wrong key never rejects every row); a retry of
    the shard may succeed once the cause is fixed."""


class StaleCheckpointError(BatchError):
    """The sink holds work of a different spec or of changed input: never reused silently."""

    retryable = False


class StorageError(BatchError, OSError):
    """An object store request failed (names the URL, the server's error and what to do)."""


class CommitError(BatchError):
    """A shard's committed state is inconsistent (missing part, bad sentinel...)."""


class IncompleteJobError(BatchError):
    """Finalize found shards of the plan that are not committed."""

    retryable = False


class RayWorkError(BatchError):
    """A shard's work on a Ray model replica failed, or Ray could not run it.

    ``retryable``: False when the replica's error was one no retry can fix (its message is
    all that crossed from the replica)."""

    def __init__(self, message: str, *, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


def is_retryable(err: BaseException) -> bool:
    """Whether running the step again can help: only core errors that say so are final."""
    return getattr(err, "retryable", True) if isinstance(err, BatchError) else True


class ShardCancelledError(RayWorkError):
    """The shard task stopped its Ray call (on_kill, execution_timeout); nothing was committed."""


class ResourcesUnavailableError(RayWorkError):
    """No node of the Ray cluster has the resources a model replica asks for."""


class CallLostError(RayWorkError):
    """A shard's Ray call was lost with its replica or node more often than the spec's
    ``max_retries`` allows within one try: a retry of the task computes what is not committed."""
