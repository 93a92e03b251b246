"""Keep freed memory in a long-lived model replica instead of handing it back to the OS.

A model's forward pass allocates and frees the same large buffers (activations of several
MiB) batch after batch. glibc serves buffers above its mmap threshold with ``mmap`` and unmaps
them on free, and trims free memory off the top of its heaps, so every batch faults the same
memory in again, and Ray runs actor calls off the main thread, where this costs the most
(measured: docs/benchmarks.md, "Keeping freed memory in a replica").

A replica serves shard after shard, so it keeps that memory mapped: allocations up to 32 MiB
(glibc's ceiling for the threshold) come from the heap, and up to 1 GiB of free heap stays
mapped for the next batch. The peak is unchanged, since the same buffers are reused rather
than faulted in again. Set ``AIRFLOW_BATCH_PROVIDER_KEEP_FREED_MEMORY=0`` in the replicas'
environment to keep glibc's defaults. Other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

from airflow_batch_provider.core.tunables import KEEP_MMAP_THRESHOLD_BYTES, KEEP_TRIM_THRESHOLD_BYTES

log = logging.getLogger(__name__)

OPT_OUT_ENV = "AIRFLOW_BATCH_PROVIDER_KEEP_FREED_MEMORY"
# mallopt() parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def is_glibc() -> bool:
    """Whether this process runs on glibc, whose malloc the settings here are for."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Tune this process's glibc malloc to reuse freed memory; True if it was applied.

    Process-wide: call it only in a process that runs nothing but the model (a replica).
    """
    if os.environ.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    applied = bool(mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD_BYTES))
    if not applied:
        log.warning("glibc rejected the malloc settings for reusing freed memory; keeping its defaults")
    return applied
