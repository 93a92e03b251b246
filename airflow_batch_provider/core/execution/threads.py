"""Overlap I/O with compute: read the next batch and write the last one while the model runs.

Arrow's readers/writers and most model runtimes release the GIL, so one reader thread and
one writer thread around the predictor keep a GPU (or the CPU's math threads) busy.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator

from airflow_batch_provider.core.tunables import PREFETCH_DEPTH, PREFETCH_JOIN_TIMEOUT_S, PREFETCH_STOP_POLL_S, WRITE_QUEUE_DEPTH

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(items: Iterable[Any], depth: int = PREFETCH_DEPTH) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, up to ``depth`` ahead of the consumer."""
    buffer: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=PREFETCH_STOP_POLL_S)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_DONE)
        except BaseException as err:  # re-raised in the consumer
            buffer.put(_Failure(err))

    thread = threading.Thread(target=produce, name="abp-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=PREFETCH_JOIN_TIMEOUT_S)


class BackgroundWriter:
    """Apply ``write`` to submitted items in one background thread, in order."""

    def __init__(self, write: Callable[[Any], None], depth: int = WRITE_QUEUE_DEPTH):
        self._write = write
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="abp-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _DONE:
            if self._error is None:
                try:
                    self._write(item)
                except BaseException as err:
                    self._error = err

    def submit(self, item: Any) -> None:
        self._raise_if_failed()
        self._queue.put(item)

    def close(self) -> None:
        """Wait for every submitted item to be written; re-raise the first write error."""
        self._queue.put(_DONE)
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
