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
#: JSONL is read in blocks of this many bytes, cut at line ends: a reader holds one at a time.
JSONL_BLOCK_BYTES = 8 << 20
#: Rows buffered before they are written as one Parquet row group (fewer only at the part's
#: end); see ``execution/writers.py`` for why row groups are neither smaller nor larger.
ROW_GROUP_ROWS = 1 << 16
#: Bytes of Arrow memory buffered before they are written as one row group, if that comes first.
ROW_GROUP_BYTES = 64 << 20
#: Batches the reader thread reads ahead of the predictor.
PREFETCH_DEPTH = 2
#: Output batches queued for the writer thread behind the predictor.
WRITE_QUEUE_DEPTH = 2
#: Seconds between the reader thread's checks that the consumer stopped (a full queue).
PREFETCH_STOP_POLL_S = 0.1
#: Seconds a stopped consumer waits for the reader thread to end (it is a daemon thread).
PREFETCH_JOIN_TIMEOUT_S = 5
#: glibc's mmap threshold in a replica: allocations up to this size come from the heap and
#: are reused batch after batch (glibc's ceiling for it); see ``execution/allocator.py``.
KEEP_MMAP_THRESHOLD_BYTES = 32 << 20
#: Free heap a replica's glibc keeps mapped for the next batch instead of trimming it.
KEEP_TRIM_THRESHOLD_BYTES = 1 << 30
#: How many bad rows a failing shard's message lists.
BAD_ROWS_SHOWN = 5
#: The plan-time sample of each JSONL shard that its input schema is inferred from: the
#: first lines, at most this many bytes and this many lines (``domain/schema/input.py``).
SCHEMA_SAMPLE_BYTES = 64 << 10
SCHEMA_SAMPLE_LINES = 500
#: Input files whose schema (footer or samples) is read side by side at plan time.
SCHEMA_SAMPLE_THREADS = 16
