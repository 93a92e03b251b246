"""Every timing and sizing figure of the core, in one place.

:class:`Tunables` holds the figures an operator of a deployment may need to change (replica
idle time, lease and connect deadlines, ...); the Airflow layer fills it from the
``[batch_inference]`` section of Airflow's configuration (see docs/reference.md, "Settings") and
hands it to the core. Everything below it is a named constant: a figure chosen once, with
the reason beside it, that no deployment should need to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def _setting(default: float | None, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Tunables:
    """What a deployment may set (Airflow: ``[batch_inference]``, one option per field, with
    the field's name). Seconds throughout; the defaults suit a cluster on a local network."""

    replica_idle_timeout_s: float = _setting(600.0, "A model replica with no shard to run for this long exits and frees its CPUs/GPUs.")
    lease_timeout_s: float | None = _setting(
        None, "How long a shard task waits for a free model replica before it fails (empty: as long as the task may run). "
              "A task's own lease_timeout wins over it.")
    node_wait_timeout_s: float = _setting(
        900.0, "On an autoscaling Ray cluster, how long a shard task waits for the autoscaler to add a node its model's "
               "replica fits on, while none of the model's replicas is up, before it fails (retryable). Cloud GPU nodes "
               "take minutes to boot and load an image.")
    connect_timeout_s: float = _setting(120.0, "How long a task keeps trying to connect to Ray before it fails.")
    start_timeout_s: float = _setting(
        60.0, "How long a deferrable shard task waits, after submitting, for the replica to take its call up before it defers.")
    cancel_grace_s: float = _setting(
        10.0, "How long a cancelled Ray call may take to stop between batches before its replica is killed.")
    deferred_timeout_grace_s: float = _setting(
        60.0, "How long after execution_timeout Airflow itself fails a deferred shard task whose trigger has not answered "
              "(the trigger cancels the Ray call at execution_timeout).")

    @classmethod
    def docs(cls) -> dict[str, str]:
        return {f.name: f.metadata["doc"] for f in fields(cls)}

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> Tunables:
        """From option values (strings, as a config file holds them; empty: the default)."""
        known = {f.name: f for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(known)}")
        parsed: dict[str, Any] = {}
        for name, raw in values.items():
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise ValueError(f"setting {name} must be a number of seconds, got {raw!r}") from None
            if value < 0:
                raise ValueError(f"setting {name} must be >= 0 seconds, got {raw!r}")
            parsed[name] = value
        return cls(**parsed)


DEFAULTS = Tunables()

# -- Ray: replicas, leases, calls (core/ray) ------------------------------------------------
#: how long the TCP check of a Ray Client server may take before a connect attempt counts as
#: failed (a server on the network answers in milliseconds; one that is down refuses at once).
CLIENT_PROBE_S = 5.0
#: longest one ``reserve`` call waits on a busy replica before the client looks at the others.
LEASE_WAIT_S = 2.0
#: how long one ``wait`` call on a replica blocks before the client asks again.
WAIT_CALL_S = 30.0
#: how long a lease round waits for replicas to answer (one still loading its model, or
#: waiting for a node, answers later; the next round asks again).
LEASE_ROUND_S = 5.0
#: a control call (status, wait, cancel) not answered this long after its own wait: the replica is lost.
REPLY_S = 30.0
#: the longest one wait for a running call blocks its process (signals are handled between waits).
RESULT_POLL_S = 1.0
#: how often a caller waiting for a replica says so in its log.
WAITING_REPORT_S = 60.0
#: how long ``find_running`` waits for replicas to say what they run (one still loading runs nothing).
FIND_RUNNING_S = 2.0
#: how often ``ShardCall.wait_started`` asks whether the replica has taken the call up.
STARTED_POLL_S = 0.1
#: a lease whose call never came is given up after this long.
LEASE_TIMEOUT_S = 120.0
#: how often a waiting ``reserve`` looks whether the holder of the lease in its way is gone.
HOLDER_CHECK_S = 1.0
#: the outcomes of finished calls a replica remembers (a retry asks for its call's outcome).
RESULTS_KEPT = 256
#: how often following one call may connect to Ray again after losing its connection (Ray
#: Client past its own reconnect grace period, 30 s by default): each loss took that long, so
#: a network that keeps dropping fails the try (a retry follows the call again) in minutes.
RECONNECTS_PER_FOLLOW = 5
#: first and longest pause between two attempts to connect to Ray.
CONNECT_FIRST_PAUSE_S = 1.0
CONNECT_MAX_PAUSE_S = 15.0
#: longest one call to a Ray client child process (``RayDriver``) may take.
DRIVER_CALL_S = 120.0
#: longest one status question from a trigger may take, through the Ray client process.
TRIGGER_STATUS_S = 60.0

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

# -- hosted model endpoints (``predictors/openai_compatible.py``); predictor_kwargs override each
#: Requests one replica keeps in flight: a hosted model's latency (0.5-30 s per answer) is
#: waited out in parallel; servers batch concurrent requests (vLLM, TGI), so 16 keeps a GPU
#: server busy without one replica crowding out the others' rate limit.
HOSTED_CONCURRENCY = 16
#: Tries after the first for one row's request (429, 5xx, timeout, dropped connection).
HOSTED_MAX_RETRIES = 6
#: Backoff before retry n is about HOSTED_BACKOFF_FIRST_S * 2**(n-1), halved at random
#: (jitter, so replicas throttled together do not come back together), at most HOSTED_BACKOFF_MAX_S:
#: 6 retries wait about 0.5+1+2+4+8+16 s, enough to ride out a gateway's restart.
HOSTED_BACKOFF_FIRST_S = 0.5
HOSTED_BACKOFF_MAX_S = 30.0
#: A server's Retry-After is honoured up to this many seconds (a longer one is waited this long).
HOSTED_RETRY_AFTER_MAX_S = 120.0
#: One request's read timeout: a long generation (thousands of tokens) takes minutes.
HOSTED_TIMEOUT_S = 300.0
#: Opening a connection: a loopback or cluster-local server answers in milliseconds.
HOSTED_CONNECT_TIMEOUT_S = 10.0
#: How much of a server's error body a row's error quotes.
HOSTED_ERROR_CHARS = 300

# -- image predictors (``predictors/images.py``); predictor_kwargs override each -------------------
#: Threads that read and decode images (and resize them to the model's input) beside the model:
#: PIL's decoders and resizers release the GIL, so a few threads keep a GPU fed without taking
#: every core from a CPU model's own math threads.
IMAGE_DECODE_THREADS = 4
#: Images per forward pass: a batch is cut into such chunks so the next chunk decodes while the
#: model runs on this one (and a large batch never holds all its decoded pixels at once).
IMAGE_MODEL_BATCH = 32
#: Chunks decoded ahead of the one the model runs on.
IMAGE_DECODE_AHEAD = 2
