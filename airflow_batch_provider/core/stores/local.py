"""Local (or NFS-style POSIX) disk: temp files, fsync, link and rename.

Staging is a hidden file under ``{directory}/_staging/`` + fsync, published with
``os.replace``; the create-only write is temp + fsync + ``os.link``; atomic replacement is
temp + fsync + ``os.replace``. Directories are fsync'ed after each rename or link.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from typing import IO, Any, Iterator

import fsspec

from airflow_batch_provider.core.stores.base import HashingWriter, StagedPart, Store, input_changed
from airflow_batch_provider.core.stores.base import os_failure as _failure

STAGING_DIR = "_staging"
_STAGED_SUFFIX = ".inprogress"


class LocalStagedPart(StagedPart):
    """A hidden file in the ``_staging/`` directory beside the final path."""

    def __init__(self, staged: str, final_path: str, *, writable: bool = False):
        self.staged = staged
        self.final_path = final_path
        self._raw = open(staged, "xb") if writable else None  # noqa: SIM115 - closed by finish() / abort()
        if self._raw is not None:
            self.stream = HashingWriter(self._raw)

    @property
    def handle(self) -> dict[str, Any]:
        return {"staged": self.staged, "final": self.final_path}

    def finish(self) -> None:
        assert self._raw is not None, "a staged part rebuilt from a handle has nothing to finish"
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()

    def publish(self) -> bool:
        try:
            os.replace(self.staged, self.final_path)
            _fsync_dir(os.path.dirname(self.final_path))
        except FileNotFoundError:
            # Already published by an earlier attempt (or its data is gone): the caller
            # tells the two apart by checking the final file against the sentinel.
            return os.path.exists(self.final_path)
        except OSError as err:
            raise _failure(err, f"publishing {self.staged} as", self.final_path) from None
        return True

    def abort(self) -> None:
        if self._raw is not None:
            with contextlib.suppress(Exception):
                self._raw.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.staged)


class LocalStore(Store):
    """Files on this machine's filesystems."""

    def __init__(self) -> None:
        super().__init__(fsspec.filesystem("file"))

    @contextlib.contextmanager
    def read_pinned(self, path: str, version: str) -> Iterator[IO[bytes]]:
        """Size + mtime (the planned version) before and after the read, and the inode of
        the file opened: a file replaced by rename while it is read is caught too. An edit
        that keeps size and mtime (``cp -p``, ``rsync -a`` in place) cannot be seen."""
        path = self._key(path)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise input_changed(path, "is gone") from None
        with handle:
            opened = os.fstat(handle.fileno())
            self._check_stat(path, opened, version)
            yield handle
            self._check_stat(path, os.fstat(handle.fileno()), version)
        try:
            after = os.stat(path)
        except FileNotFoundError:
            raise input_changed(path, "is gone") from None
        if after.st_ino != opened.st_ino:
            raise input_changed(path, "was replaced by another file while it was read")

    def _check_stat(self, path: str, stat: os.stat_result, version: str) -> None:
        now = self.version_of({"size": stat.st_size, "mtime": stat.st_mtime})
        if now != version:
            raise input_changed(path, f"changed (version {version} when planned, {now} now)")

    def write_atomic(self, path: str, data: bytes) -> None:
        try:
            tmp = _write_temp(path, data)
            os.replace(tmp, path)
            _fsync_dir(os.path.dirname(path))
        except OSError as err:
            raise _failure(err, "writing", path) from None

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Temp file + ``link``. A link retried underneath (NFS) can answer EEXIST for our own
        create: the caller recognises its own content (the attempt token) after a False."""
        try:
            tmp = _write_temp(path, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            _fsync_dir(os.path.dirname(path))
        except OSError as err:
            raise _failure(err, "creating", path) from None
        return True

    def remove_if_unchanged(self, path: str, expected: bytes) -> bool:
        """Take the file away by renaming it (atomic), then compare: what is not ``expected``
        (a sentinel committed after the caller read it) is linked back, create-only."""
        taken = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.removing")
        try:
            try:
                os.rename(path, taken)
            except FileNotFoundError:
                return False
            with open(taken, "rb") as handle:
                same = handle.read() == expected
            if not same:
                try:
                    os.link(taken, path)
                except FileExistsError:
                    return False  # yet another file there now: keep what we took, hidden
            os.unlink(taken)
            _fsync_dir(os.path.dirname(path))
        except OSError as err:
            raise _failure(err, "removing", path) from None
        return same

    def open_staged(self, final_path: str) -> LocalStagedPart:
        directory, name = os.path.split(final_path)
        staging = os.path.join(directory, STAGING_DIR)
        staged = os.path.join(staging, f"{name}.{uuid.uuid4().hex[:12]}{_STAGED_SUFFIX}")
        try:
            os.makedirs(staging, exist_ok=True)
            return LocalStagedPart(staged, final_path, writable=True)
        except OSError as err:
            raise _failure(err, "staging", final_path) from None

    def staged_from(self, handle: dict[str, Any]) -> LocalStagedPart:
        return LocalStagedPart(handle["staged"], handle["final"])

    def list_staged(self, directory: str) -> list[StagedPart]:
        staging = os.path.join(directory, STAGING_DIR)
        staged: list[StagedPart] = []
        for name in self.list_files(staging):
            if name.endswith(_STAGED_SUFFIX):
                part = LocalStagedPart(os.path.join(staging, name), os.path.join(directory, name.rsplit(".", 2)[0]))
                part.started_at = self.modified_at(part.staged)
                staged.append(part)
        return staged


def _write_temp(path: str, data: bytes) -> str:
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    with open(tmp, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return tmp


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems refuse fsync on directories
        if err.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)
