"""Every runnable example of the docs (``docs/examples/*.py``) runs as a reader would run it.

The convention (docs/predictors.md, *Runnable examples*): each file is a self-contained script,
``python docs/examples/<name>.py [work_dir]`` from the repository root; it builds what it needs
offline under ``work_dir`` (a new temp dir without it), runs a real job, checks its own sink
with asserts and prints ``example ok`` last. Files whose name starts with ``_`` are not
examples, nor are directories (code an example ships to its replicas).

Each runs in a child process. They share one Ray head started here (``RAY_ADDRESS``, which the
examples' ``api.connect()`` honours, as a reader's would), instead of each starting a local
Ray of its own: that start is most of a small example's time, and the suite's budget is tight.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.ray_cluster import RayCluster

pytestmark = pytest.mark.slow

EXAMPLES = Path(ROOT) / "docs" / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def ray_head():
    cluster = RayCluster("examples", head_cpus=2).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_there_are_examples():
    assert {"linear.py", "sentence_embedding.py", "generation.py", "openai_compatible.py", "custom_predictor.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_runs_and_checks_its_sink(name, ray_head, tmp_path):
    env = {**ray_head.env(), "RAY_ADDRESS": ray_head.address}
    started = time.monotonic()
    out = subprocess.run([sys.executable, str(EXAMPLES / name), str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    assert out.returncode == 0, f"{name} failed (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    assert out.stdout.rstrip().splitlines()[-1] == "example ok", out.stdout[-3000:]
    print(f"\n{name}: {seconds:.1f} s")
