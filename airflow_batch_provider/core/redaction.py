"""Secret values never leave in error text: the one place that takes them out.

A predictor's secret arguments (``BatchSpec.predictor_secrets``, resolved by the Airflow
layer) reach the runner and the replica with the call. A predictor's own error may name one
(an HTTP client error quoting ``...?key=<secret>``); whatever the core writes to the sink
(``_rejected/*.jsonl``) or raises (the shard's error, which lands in the task log and the
replica's status) passes through :func:`redact` first.
"""

from __future__ import annotations

from collections.abc import Iterable

REDACTED = "***"


class Redactor:
    """Replaces each of a job's secret values by ``***`` in text and in exceptions."""

    def __init__(self, secrets: Iterable[str] = ()):
        # Longest first: a secret that contains another is replaced whole.
        self._values = sorted({s for s in secrets if isinstance(s, str) and s}, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._values)

    def text(self, text: str) -> str:
        for value in self._values:
            text = text.replace(value, REDACTED)
        return text

    def names_a_secret(self, err: BaseException) -> bool:
        """Whether ``err``, or an exception it was raised from (what a traceback prints), holds a secret."""
        seen: set[int] = set()
        current: BaseException | None = err
        while current is not None and id(current) not in seen and self._values:
            seen.add(id(current))
            if self.text(str(current)) != str(current) or any(self.text(repr(a)) != repr(a) for a in current.args):
                return True
            current = current.__cause__ or current.__context__
        return False

    def error(self, err: BaseException) -> BaseException:
        """``err`` itself when it names no secret; else an error of the same message with each
        secret replaced, raised from nothing (its chain would print the secret)."""
        if not self.names_a_secret(err):
            return err
        message = self.text(str(err))
        try:
            clean = type(err)(message)
            if str(clean) != message:
                raise TypeError
        except Exception:
            from airflow_batch_provider.core.errors import BatchError

            clean = BatchError(f"{type(err).__name__}: {message}")
        clean.__cause__ = None
        clean.__suppress_context__ = True
        return clean


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` replaced by ``***``."""
    return Redactor(secrets).text(text)
