"""The deployment's settings of the core (``[batch_inference]`` in Airflow's configuration).

Each option is a field of :class:`~airflow_batch_provider.core.api.Tunables`, in seconds;
an option left out keeps the core's default. Set them as any Airflow option, in
``airflow.cfg`` or as ``AIRFLOW__BATCH_INFERENCE__<OPTION>`` in the environment of the
workers and the triggerer. ``airflow config list --section batch_inference`` shows them.
"""

from __future__ import annotations

from airflow.sdk import conf

from airflow_batch_provider.core import api

SECTION = "batch_inference"


def tunables() -> api.Tunables:
    """The settings as this process's Airflow configuration has them (read when called)."""
    try:
        return api.Tunables.from_values(configured())
    except ValueError as err:
        raise api.BatchSpecError(f"[{SECTION}] in Airflow's configuration: {err}") from None


def configured() -> dict[str, str]:
    """Only the options the deployment set (a process that hands them on to another, such as
    the trigger to its Ray client process, leaves the others at the core's defaults)."""
    values = {name: conf.get(SECTION, name, fallback=None) for name in api.Tunables.names()}
    return {name: value for name, value in values.items() if value not in (None, "")}


def provider_config() -> dict:
    """The section as ``get_provider_info()["config"]`` declares it (docs, ``airflow config list``)."""
    defaults = api.Tunables()
    docs = {
        "replica_idle_timeout_s": "A model replica with no shard to run for this long exits and frees its CPUs/GPUs.",
        "lease_timeout_s": "How long a shard task waits for a free model replica before it fails (empty: as long as "
                           "the task may run). A task's own lease_timeout wins over it.",
        "connect_timeout_s": "How long a task keeps trying to connect to Ray before it fails.",
        "start_timeout_s": "How long a deferrable shard task waits, after submitting, for the replica to take its call "
                           "up before it defers.",
        "cancel_grace_s": "How long a cancelled Ray call may take to stop between batches before its replica is killed.",
        "deferred_timeout_grace_s": "How long after execution_timeout Airflow itself fails a deferred shard task whose "
                                    "trigger has not answered (the trigger cancels the Ray call at execution_timeout).",
    }
    options = {}
    for name in api.Tunables.names():
        default = getattr(defaults, name)
        options[name] = {
            "description": docs[name],
            "version_added": "0.2.0",
            "type": "float",
            "example": None,
            "default": "" if default is None else str(default),
        }
    return {SECTION: {"description": "Timeouts of batch inference on Ray: replicas, leases, connections, cancellation.",
                      "options": options}}
