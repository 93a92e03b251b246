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

#: Multipart part size. S3 needs >= 5 MiB for every part but the last; 8 MiB keeps memory
#: per writing shard small while a 10 GiB part still needs only 1,280 of the 10,000 parts.
S3_PART_SIZE = 8 << 20
#: s3fs read block (readahead): a JSONL block or a Parquet column chunk per ranged GET.
S3_READ_BLOCK = 8 << 20
#: tries of a conditional PUT that S3 answers 409 ConditionalRequestConflict (another
#: conditional write of the key in flight) before the task fails and its retry decides
S3_CONFLICT_TRIES = 4
#: seconds before the n-th retry of such a PUT: n times this
S3_CONFLICT_BACKOFF_S = 0.2
#: connections of one process's S3 client (botocore's ``max_pool_connections``, 10 by
#: default): one client is shared by every thread of the process
S3_MAX_POOL_CONNECTIONS = 32

# -- the job's files: plan, commits, inspection (core/domain) -------------------------------

#: input files split (listed, footers or lines read) side by side while planning
PLAN_SPLIT_THREADS = 16
#: read size when a JSONL input is scanned for its shard boundaries
PLAN_SCAN_BLOCK = 8 << 20
#: shards finalize checks side by side (a sentinel GET and a size each)
FINALIZE_CHECK_THREADS = 16
#: Staged data idle this long is an orphan (its attempt crashed or lost): a live attempt
#: writes its part in parts of at most 8 MiB, far more often than this.
ORPHAN_GRACE_S = 3600.0
#: parts finalize re-types side by side (read, rewrite, re-hash each)
RETYPE_THREADS = 8
#: read size when a part is hashed (finalize's re-typing, ``verify``)
HASH_BLOCK = 8 << 20
#: sentinels status, verify and gc read side by side (one GET each)
SENTINEL_READ_THREADS = 32
#: parts ``verify`` re-reads side by side
VERIFY_THREADS = 8
#: sentinels are created once and never change: a long-lived reader (the status page in the
#: api-server) keeps the ones it has read, keyed by path and version, and fetches only new ones.
SENTINELS_KEPT = 500_000
#: the last commits a status shows
LAST_COMMITS_SHOWN = 10

# -- reading, computing, writing a shard (core/execution) -----------------------------------
