"""The provider's exceptions: what an Airflow task of a batch inference job raises."""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException, AirflowFailException


class BatchInferenceException(AirflowException):
    """A batch inference step failed; the message says which shard or file and what to do.
    Airflow retries the task (``retries``): the failure may pass (a store, a node, an endpoint)."""


class BatchInferenceFailure(BatchInferenceException, AirflowFailException):
    """A batch inference step failed in a way no retry can fix (the spec, the input data or
    the sink's checkpoint must change first): Airflow fails the task without retrying it."""


def task_error(message: str, *, retryable: bool = True) -> BatchInferenceException:
    """The exception a task raises: a :class:`BatchInferenceFailure` when no retry can fix the
    failure. Raise it ``from`` the core error, which then stays its cause (type and message)."""
    return (BatchInferenceException if retryable else BatchInferenceFailure)(message)
