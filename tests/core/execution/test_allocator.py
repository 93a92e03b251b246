"""A replica keeps freed memory for its next batch instead of faulting it in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from airflow_batch_provider.core.execution import allocator
from tests.helpers import ROOT

glibc_only = pytest.mark.skipif(not allocator.is_glibc(), reason="the malloc settings are glibc's; other C libraries are left alone")

# Batch after batch in a non-main thread (where Ray runs actor calls), like a forward pass:
# six buffers of 1-30 MiB (sizes vary with each batch's padded length) written and freed.
# Prints the minor page faults that took.
_BATCHES = """
import json, resource, sys, threading
import numpy as np
sys.path.insert(0, {root!r})
from airflow_batch_provider.core.execution.allocator import keep_freed_memory
applied = keep_freed_memory()
faults = []
def batches():
    sizes = np.random.default_rng(0).integers(1, 31, size=(100, 6))
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for batch in sizes:
        live = []
        for mib in batch:
            live.append(np.empty(int(mib) << 20, dtype=np.uint8))
            live[-1].fill(1)
        del live
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=batches)
thread.start()
thread.join()
print(json.dumps({{"applied": applied, "faults": faults[0]}}))
"""


def _run_batches(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _BATCHES.format(root=ROOT)], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_buffers_are_reused_not_faulted_in_again():
    default = _run_batches(**{allocator.OPT_OUT_ENV: "0"})
    kept = _run_batches()
    assert default["applied"] is False and kept["applied"] is True
    # glibc's defaults unmap or trim much of each batch's memory and fault it in again for the next
    assert default["faults"] >= 5 * kept["faults"], (default, kept)


@pytest.mark.parametrize("value", ["0", "false", "No", "off"])
def test_opt_out_keeps_glibc_defaults(monkeypatch, value):
    monkeypatch.setenv(allocator.OPT_OUT_ENV, value)
    assert allocator.keep_freed_memory() is False


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert allocator.keep_freed_memory() is False
