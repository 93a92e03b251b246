"""The spec a DAG author writes: the core's ``BatchSpec`` plus the Airflow connection for S3.

The core takes storage options and knows nothing of Airflow connections. Airflow names
object-store credentials by connection id (``storage_conn_id``, default ``aws_default``) and
also accepts them inside URLs, as ``ObjectStoragePath`` does: ``s3://conn_id@bucket/key``.
This class strips such ids from the URLs when it is built (at DAG parse time), so what is
logged, listed and written never carries connection names into object keys, and one job
uses exactly one connection. The Airflow layer resolves the id into storage options in the
task process (:func:`airflow_batch_provider.hooks.storage.storage_options_for`) and hands
the core :meth:`BatchSpec.core`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from airflow_batch_provider.core import api


@dataclass(frozen=True)
class BatchSpec(api.JobSpec):
    """:class:`airflow_batch_provider.core.spec.JobSpec` (every field documented there) and:

    :param storage_conn_id: Airflow ``aws`` connection for S3 credentials (default
        ``aws_default``). URLs may name it instead, as ``s3://conn_id@bucket/prefix``.

    ``predictor_secrets`` references are ``conn:<conn_id>`` (the connection's password) or
    ``var:<key>`` (an Airflow Variable), resolved in the task process.
    """

    storage_conn_id: str | None = None

    def __post_init__(self, num_workers: int | None = None) -> None:
        self._take_conn_id_from_urls()
        super().__post_init__(num_workers)
        for kwarg, reference in self.predictor_secrets.items():
            check_secret_reference(kwarg, reference)
        if self.storage_conn_id is not None and (not isinstance(self.storage_conn_id, str) or not self.storage_conn_id.strip()):
            raise api.BatchSpecError(f"storage_conn_id must be a non-empty string, got {self.storage_conn_id!r}")

    def core(self) -> api.JobSpec:
        """The same job without the connection id: what the core runs."""
        return api.JobSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(api.JobSpec)})

    def _take_conn_id_from_urls(self) -> None:
        found: dict[str, str] = {}
        for name in ("source", "sink", "checkpoint_dir"):
            value = getattr(self, name)
            if not isinstance(value, str):
                continue
            url, conn_id = split_conn_id(value)
            if conn_id:
                object.__setattr__(self, name, url)
                found[name] = conn_id
        ids = set(found.values()) | ({self.storage_conn_id} if self.storage_conn_id and found else set())
        if len(ids) > 1:
            named = ", ".join(f"{k}: {v!r}" for k, v in found.items())
            if self.storage_conn_id:
                named += f", storage_conn_id: {self.storage_conn_id!r}"
            raise api.BatchSpecError(
                f"the URLs name different connections ({named}); one job reads and writes with one "
                "aws connection: use the same conn_id everywhere, or drop it from the URLs and set storage_conn_id"
            )
        if found and not self.storage_conn_id:
            object.__setattr__(self, "storage_conn_id", next(iter(ids)))


def split_conn_id(url: str) -> tuple[str, str | None]:
    """``s3://conn_id@bucket/key`` (Airflow's ObjectStoragePath form) -> (``s3://bucket/key``, conn_id).

    URLs without a connection id, and non-S3 URLs, come back unchanged with None. Bucket
    names cannot hold ``@``, so the split is unambiguous.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in api.S3_SCHEMES:
        return url, None
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return url, None
    conn_id, _, bucket = authority.rpartition("@")
    return f"{scheme}://{bucket}{slash}{path}", conn_id or None


SECRET_KINDS = ("conn", "var")


def check_secret_reference(kwarg: str, reference: str) -> None:
    """A ``predictor_secrets`` reference must be ``conn:<conn_id>`` or ``var:<key>``. What was
    given instead is never echoed: it is most likely the secret itself, and this message ends
    up in the DAG import error and the logs."""
    kind, _, name = reference.partition(":")
    if kind not in SECRET_KINDS or not name:
        raise api.BatchSpecError(
            f"predictor_secrets[{kwarg!r}] is not a reference to a secret (its value is not shown: it may be the "
            "secret itself; if so, rotate it). Write 'conn:<conn_id>' (the connection's password) "
            "or 'var:<key>' (an Airflow Variable), and keep the value in that connection or variable"
        )
