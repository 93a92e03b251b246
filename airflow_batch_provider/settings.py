"""The deployment's settings of the core (``[batch_inference]`` in Airflow's configuration).

Each option is a field of :class:`~airflow_batch_provider.core.api.Tunables`, in seconds;
an option left out keeps the core's default. Set them as any Airflow option, in
``airflow.cfg`` or as ``AIRFLOW__BATCH_INFERENCE__<OPTION>`` in the environment of the
workers and the triggerer. ``airflow config list --section batch_inference`` shows them.
"""

from __future__ import annotations

from airflow.sdk import conf

from airflow_batch_provider.core import api
from airflow_batch_provider.get_provider_info import CONFIG_SECTION as SECTION


def tunables() -> api.Tunables:
    """The settings as this process's Airflow configuration has them (read when called)."""
    try:
        return api.Tunables.from_values(configured())
    except ValueError as err:
        raise api.BatchSpecError(f"[{SECTION}] in Airflow's configuration: {err}") from None


def configured() -> dict[str, str]:
    """Only the options the deployment set to something else than the core's default (a
    process that hands them on to another, such as the trigger to its Ray client process,
    leaves the others at the core's defaults there)."""
    defaults = api.Tunables()
    values = {name: conf.get(SECTION, name, fallback=None) for name in api.Tunables.names()}
    return {name: value for name, value in values.items()
            if value not in (None, "") and _number(value) != getattr(defaults, name)}


def _number(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value  # not a number: ``tunables`` names it
