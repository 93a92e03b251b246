"""The provider's exception: what an Airflow task of a batch inference job raises."""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException


class BatchInferenceException(AirflowException):
    """A batch inference step failed; the message says which shard or file and what to do."""
