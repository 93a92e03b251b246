"""Named crash points for crash-safety tests; inert unless ``ABP_FAILPOINTS`` is set.

``ABP_FAILPOINTS="before_sentinel=kill@/tmp/once"`` makes the process that reaches the
``before_sentinel`` point SIGKILL itself, once: the marker file records that it fired, so
Ray's retry of the same work (or a rerun) gets past it. Actions: ``kill`` (SIGKILL, as an
OOM kill or a lost node would) and ``raise`` (a Python exception). Without ``@marker`` the
point fires every time. Points: ``ray_connect`` (before ``ray.init``), ``mid_part``, ``before_sentinel``, ``before_publish``,
``before_publish_rejected``, ``after_publish``, ``finalize_before_manifest``, and finalize's
re-typing of a part (``RETYPE_POINTS``, reached only by a job whose output column widened
from type null; ``domain/retype.py``).
"""

from __future__ import annotations

import os
import signal

ENV = "ABP_FAILPOINTS"
#: every point the code passes, in the order a job reaches them (the fault matrix test runs each)
POINTS = ("mid_part", "before_sentinel", "before_publish", "before_publish_rejected", "after_publish", "finalize_before_manifest")
#: finalize re-typing a part: after staging it, after replacing its sentinel (before publishing)
RETYPE_POINTS = ("retype_before_sentinel", "retype_before_publish")
#: a re-drive's commit: before its sentinel, before publishing its part and rejected rows, and
#: before retiring the rejected-rows file it computed again
REDRIVE_POINTS = ("redrive_before_sentinel", "redrive_before_publish", "redrive_before_retire")


class FailpointError(RuntimeError):
    """Raised by a failpoint whose action is ``raise``."""


def hit(name: str) -> None:
    config = os.environ.get(ENV)
    if not config:
        return
    for entry in config.split(","):
        point, _, rest = entry.partition("=")
        if point.strip() != name:
            continue
        action, _, marker = rest.partition("@")
        if marker:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue  # fired before
            os.close(fd)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise FailpointError(f"failpoint {name} fired")
