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


class PredictorError(BatchError):
    """The predictor could not be loaded, or returned something that is not a batch."""


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
