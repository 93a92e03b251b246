"""The predictor's secret arguments (an API key of a hosted model, say), from Airflow.

``BatchSpec.predictor_secrets`` names where each one lives: ``conn:<conn_id>`` (the
connection's password) or ``var:<key>`` (an Airflow Variable). They are resolved here, in the
task process that starts or leases the model replicas, and never written anywhere: the spec,
XCom, rendered fields, trigger kwargs, the plan, the sentinels and ``_SUCCESS`` hold only the
references, and the values reach the replicas through Ray's object store. Each value is
registered with Airflow's secrets masker as it is resolved, so a log line that quotes it
(a library's debug output, say) shows ``***``; the core takes the values out of the errors
it writes or raises itself (``core/redaction.py``).
"""

from __future__ import annotations

from airflow.sdk import BaseHook, Variable
from airflow.sdk.log import mask_secret

from airflow_batch_provider.core.api import BatchSpecError
from airflow_batch_provider.spec import check_secret_reference


def resolve_predictor_secrets(references: dict[str, str]) -> dict[str, str] | None:
    """``{kwarg: value}`` for ``{kwarg: reference}``; None when there are none."""
    if not references:
        return None
    values = {}
    for kwarg, reference in references.items():
        check_secret_reference(kwarg, reference)
        kind, _, name = reference.partition(":")
        if kind == "conn":
            value = BaseHook.get_connection(name).password
        else:
            value = Variable.get(name)
        if not value:
            raise BatchSpecError(f"predictor_secrets[{kwarg!r}]: {reference} holds no value (an empty password or variable)")
        mask_secret(value, kwarg)
        values[kwarg] = value
    return values
