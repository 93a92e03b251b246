"""Every timing and sizing figure of the core, in one place.

:class:`Tunables` holds the figures an operator of a deployment may need to change (replica
idle time, lease and connect deadlines, ...); the Airflow layer fills it from the
``[batch_inference]`` section of Airflow's configuration (see the README's "Settings") and
hands it to the core. Everything below it is a named constant: a figure chosen once, with
the reason beside it, that no deployment should need to change.
"""

from __future__ import annotations

# -- Ray: replicas, leases, calls (core/ray) ------------------------------------------------

# -- object stores (core/stores) ------------------------------------------------------------

# -- the job's files: plan, commits, inspection (core/domain) -------------------------------

# -- reading, computing, writing a shard (core/execution) -----------------------------------
