"""Shared test setup: the repository on sys.path (and PYTHONPATH, for Ray workers), a new
local Ray per run (never another cluster on this machine), and the S3 server fixtures."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
os.environ.setdefault("RAY_ADDRESS", "local")

from tests.s3_server import s3_bucket, s3_server  # noqa: E402,F401  (pytest fixtures)
