"""The counters a predictor reports for its batches (tokens, requests, ...): see ``docs/counting.md``.

``add(name, value)`` from a predictor's ``__call__`` adds to the counter of the shard being
computed; the totals reach the shard's sentinel, ``_SUCCESS``, the status page, the CLI, the
task log's events and the sink's Asset event. Importing this needs no Airflow (the replicas
import it on the Ray cluster). The implementation is the core's (``core/counters.py``).
"""

from __future__ import annotations

from airflow_batch_provider.core.counters import RESERVED, add

__all__ = ["RESERVED", "add"]
