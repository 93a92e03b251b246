"""Code shipped to the replicas: the local directories of a ``runtime_env``, uploaded to the cluster.

Ray (2.60) uploads the local ``working_dir`` and ``py_modules`` of a runtime_env only for the
one a driver gives ``ray.init`` (its job's); an actor's must name URIs, else Ray refuses it
("only supported at the job level"). Replicas are created by whichever task of a job comes
first, each task its own Ray job, so the pool uploads the directories itself, as ``ray.init``
would: each is zipped and stored in the cluster's GCS under a URI named by a hash of its
content (``gcs://_ray_pkg_<hash>.zip``), and only when no package of that hash is there yet.

The replicas get, and are keyed by, the runtime_env with those URIs: the same code yields the
same runtime_env in every task and on every Airflow worker (so the same replicas), and changed
code yields new replicas rather than old ones running it. A local directory must therefore
exist, with the same content, wherever a task of the job runs (code in the DAG bundle, say);
keep it to code (a model's weights belong in storage the predictor reads). URIs Ray fetches
itself (``s3://.../code.zip``, ``gcs://...``) are passed through untouched.

Through Ray Client (``ray://``) the upload goes over the client connection, as Ray's own does,
but unpinned: Ray 2.60's client server answers "pin this package for a while" only before the
connection is made (for ``ray.init``'s own upload) and never after (the call is retried
forever). The pin only keeps a package that no actor uses yet from being collected; Ray
collects a package when the last job or actor that used it ends, and the replica created right
after the upload uses it.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from airflow_batch_provider.core.errors import BatchSpecError

log = logging.getLogger(__name__)

#: The runtime_env keys whose local paths must be uploaded before an actor can use them.
UPLOADED_KEYS = ("working_dir", "py_modules")


def shipped(runtime_env: dict[str, Any] | None) -> dict[str, Any] | None:
    """``runtime_env`` with its local ``working_dir`` and ``py_modules`` uploaded to the cluster
    this process is connected to and replaced by their URIs (unchanged when it has none)."""
    if not runtime_env or not any(key in runtime_env for key in UPLOADED_KEYS):
        return runtime_env
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    env = copy.deepcopy(runtime_env)
    # As ray.init does (a Ray Client's too): .gitignore and .rayignore files are honoured unless
    # Ray is told otherwise; the zips are built in a scratch directory of their own.
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    try:
        with _unpinned_through_ray_client(), tempfile.TemporaryDirectory(prefix="abp-runtime-env-") as scratch_dir:
            env = upload_py_modules_if_needed(env, include_gitignore=include_gitignore, scratch_dir=scratch_dir, logger=log)
            env = upload_working_dir_if_needed(env, include_gitignore=include_gitignore, scratch_dir=scratch_dir, logger=log)
    except (ValueError, TypeError, OSError) as err:
        where = {key: runtime_env[key] for key in UPLOADED_KEYS if key in runtime_env}
        raise BatchSpecError(
            f"runtime_env {where} cannot be shipped to the Ray cluster: {err}. A local directory must exist, with the same "
            "content, wherever the job's tasks run; or name a package URI Ray fetches itself (e.g. 's3://bucket/code.zip')"
        ) from None
    env.pop("excludes", None)  # applied by the upload; the URIs need no more
    return env


#: Ray reads the pin's duration from this environment variable on every upload (0: no pin).
_PIN_SECONDS_VARIABLE = "RAY_RUNTIME_ENV_TEMPORARY_REFERENCE_EXPIRATION_S"
_pin_setting = threading.Lock()


@contextmanager
def _unpinned_through_ray_client() -> Iterator[None]:
    """Uploads in this block are not pinned when this process is a Ray Client (see the module's docstring)."""
    from airflow_batch_provider.core.ray import connection

    if not connection.through_ray_client():
        yield
        return
    with _pin_setting:
        before = os.environ.get(_PIN_SECONDS_VARIABLE)
        os.environ[_PIN_SECONDS_VARIABLE] = "0"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(_PIN_SECONDS_VARIABLE, None)
            else:
                os.environ[_PIN_SECONDS_VARIABLE] = before
