"""Every runnable example of the docs (``docs/examples/*.py``) runs as a reader would run it.

The convention (docs/predictors.md, *Runnable examples*): each file is a self-contained script,
``python docs/examples/<name>.py [work_dir]`` from the repository root; it builds what it needs
offline under ``work_dir`` (a new temp dir without it), runs a real job, checks its own sink
with asserts and prints ``example ok`` last. Files whose name starts with ``_`` are not examples.
Each runs in a child process, as a reader would, on a local Ray of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

EXAMPLES = Path(ROOT) / "docs" / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def test_there_are_examples():
    assert {"linear.py", "sentence_embedding.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_runs_and_checks_its_sink(name, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["RAY_ADDRESS"] = "local"  # a new local Ray of its own, never a cluster someone started on this machine
    started = time.monotonic()
    out = subprocess.run([sys.executable, str(EXAMPLES / name), str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    assert out.returncode == 0, f"{name} failed (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    assert out.stdout.rstrip().splitlines()[-1] == "example ok", out.stdout[-3000:]
    print(f"\n{name}: {seconds:.1f} s")
