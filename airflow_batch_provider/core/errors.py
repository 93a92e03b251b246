"""Errors of the core.

They derive from plain Python exceptions so the core stays free of Airflow; the Airflow
layer wraps them in :class:`airflow_batch_provider.exceptions.BatchInferenceException`.
Every message names the file, row or field at fault and says what to do.
"""

from __future__ import annotations


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
