"""Errors of the core.

They derive from plain Python exceptions so the core stays free of Airflow; the Airflow
layer wraps them in :class:`airflow_batch_provider.exceptions.BatchInferenceException`.
Every message names the file, row or field at fault and says what to do.
"""

from __future__ import annotations


class BatchError(Exception):
    """Base class of everything this package raises on purpose."""


class BatchSpecError(BatchError, ValueError):
    """A BatchSpec field has a value we cannot run."""


class InputDataError(BatchError, ValueError):
    """An input file cannot be read as the declared format (names the file and row)."""


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


class PredictorFailedError(PredictorError):
    """The predictor raised on a batch (names the shard, the file and the batch's lines or rows)."""


class StaleCheckpointError(BatchError):
    """The sink holds work of a different spec or of changed input: never reused silently."""


class StorageError(BatchError, OSError):
    """An object store request failed (names the URL, the server's error and what to do)."""


class CommitError(BatchError):
    """A shard's committed state is inconsistent (missing part, bad sentinel...)."""


class IncompleteJobError(BatchError):
    """Finalize found shards of the plan that are not committed."""


class RayWorkError(BatchError):
    """A shard's work on a Ray model replica failed, or Ray could not run it."""


class ShardCancelledError(RayWorkError):
    """The shard task stopped its Ray call (on_kill, execution_timeout); nothing was committed."""


class ResourcesUnavailableError(RayWorkError):
    """No node of the Ray cluster has the resources a model replica asks for."""
