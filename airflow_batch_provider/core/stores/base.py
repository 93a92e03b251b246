"""The store interface, and what every backend shares: listing and reading through fsspec.

Committing progress needs three primitives that fsspec does not offer with the guarantees we
need, so each backend implements them itself (``local.py``, ``s3.py``):

* ``create_exclusive(path, data)``: create a small file only if it does not exist, atomically
  (the commit point of a shard: exactly one attempt can win it).
* ``open_staged(final_path)``: a :class:`StagedPart` that streams a part so that it is durable
  but not yet visible at ``final_path``; ``publish()`` makes it visible, ``abort()`` throws it
  away. Its ``handle`` is JSON-able and stored in the sentinel, so a crash between commit and
  publish is rolled forward by whoever reads the sentinel next (``staged_from(handle)``).
* ``write_atomic(path, data)``: replace a small file (plan, manifest) all at once.
* ``remove_if_unchanged(path, expected)``: delete a small file only if it still holds
  ``expected`` (quarantine and withdrawal must never delete a sentinel committed meanwhile).

Every failure of these primitives is a ``StorageError`` naming the path and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import posixpath
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Iterator

import fsspec

from airflow_batch_provider.core.errors import InputChangedError, StorageError
from airflow_batch_provider.core.stores.urls import with_scheme_of

_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class FileInfo:
    """One listed file: its name relative to the listed prefix, size, and version tag."""

    name: str
    size: int
    version: str


@dataclass(frozen=True)
class InputFile:
    """One input file found under a source: how to address it and what version was seen."""

    path: str  # full path or URL, as the store addresses it
    relpath: str  # relative to the source root: the stable part of shard ids
    size: int
    version: str


class HashingWriter:
    """Binary file wrapper counting and hashing what is written (the part's checksum)."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._sha = hashlib.sha256()
        self.bytes_written = 0
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._sha.update(data)
        self.bytes_written += len(data)
        self._raw.write(data)
        return len(data)

    def tell(self) -> int:
        return self.bytes_written

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


class StagedPart(ABC):
    """A part being written: write to ``stream``, ``finish()`` to make it durable, then either
    ``publish()`` (visible at ``final_path``) or ``abort()`` (gone; the final path untouched).

    One rebuilt from a sentinel's handle (``Store.staged_from``) has no stream: it can only be
    published or aborted."""

    final_path: str
    stream: HashingWriter
    #: when the staging began (epoch seconds), where the store knows it (``list_staged``)
    started_at: float | None = None

    def last_activity(self) -> float | None:
        """When this staging last made progress (epoch seconds), where the store knows it: a
        writer still streaming is younger than any grace period, whenever it began."""
        return self.started_at

    @property
    @abstractmethod
    def handle(self) -> dict[str, Any]:
        """JSON-able description, stored in the sentinel to roll a crash forward."""

    @abstractmethod
    def finish(self) -> None:
        """Make everything written durable (still invisible to readers)."""

    @abstractmethod
    def publish(self) -> bool:
        """Make the part visible at its final path; idempotent. False if its data is gone."""

    @abstractmethod
    def abort(self) -> None:
        """Throw the staged data away; never touches what is at the final path."""


class Store(ABC):
    """A directory tree on some filesystem, addressed by URL or local path."""

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self._fs = fs

    # -- reading -----------------------------------------------------------------------
    def open_read(self, path: str, size: int | None = None) -> IO[bytes]:
        """Open ``path`` to read. ``size``: its size as listed, which spares object stores a
        metadata request per file (planning reads thousands of small files this way)."""
        return self._fs.open(path, "rb")

    @contextlib.contextmanager
    def read_pinned(self, path: str, version: str) -> Iterator[IO[bytes]]:
        """``open_read``, for exactly the ``version`` the plan recorded of ``path``: checked
        before the read and after it (when the reader got to the end). A file gone or of
        another version raises :class:`InputChangedError`. Backends that can make every
        request conditional do so (S3)."""
        self.check_version(path, version)
        with self.open_read(path) as handle:
            yield handle
        self.check_version(path, version)

    def check_version(self, path: str, version: str) -> None:
        try:
            info = self._fs.info(path)
        except FileNotFoundError:
            raise input_changed(path, "is gone") from None
        now = self.version_of(info)
        if now != version:
            raise input_changed(path, f"changed (version {version} when planned, {now} now)")

    def read_bytes(self, path: str) -> bytes | None:
        """File content, or None when it does not exist."""
        try:
            return self._fs.cat_file(path)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise os_failure(err, "reading", path) from None

    def exists(self, path: str) -> bool:
        return self._fs.exists(path)

    def size(self, path: str) -> int | None:
        try:
            return int(self._fs.info(path)["size"])
        except FileNotFoundError:
            return None

    def list_files(self, prefix: str) -> dict[str, FileInfo]:
        """Files directly under ``prefix`` (not recursive), by base name. Errors propagate."""
        try:
            entries = self._fs.ls(prefix, detail=True)
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise os_failure(err, "listing", prefix) from None
        files = {}
        for entry in entries:
            if entry.get("type") != "file":
                continue
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            files[name] = FileInfo(name=name, size=int(entry["size"]), version=self.version_of(entry))
        return files

    def find_inputs(self, source: str, extensions: tuple[str, ...]) -> list[InputFile] | None:
        """The files a source names: a glob's matches, a directory's files (recursively) with
        one of ``extensions``, or the one file. Relative paths are taken from the glob's fixed
        part, the directory, or the file's directory. None when nothing is at ``source``."""
        if any(ch in source for ch in _GLOB_CHARS):
            root = _glob_root(source)
            infos = self._fs.glob(self._key(source), detail=True)
            matches = [(name, info) for name, info in infos.items() if info.get("type") == "file"]
        elif self._fs.isdir(source):
            root = source
            infos = self._fs.find(self._key(source), detail=True, withdirs=False)
            matches = [(name, info) for name, info in infos.items() if name.lower().endswith(extensions)]
        elif self._fs.exists(source):
            root = posixpath.dirname(source.rstrip("/"))
            matches = [(source, self._fs.info(source))]
        else:
            return None
        root_key = self._key(root).rstrip("/")
        files = []
        for name, info in matches:
            key = self._key(name)
            files.append(
                InputFile(
                    path=with_scheme_of(source, key),
                    relpath=posixpath.relpath(key, root_key) if root_key else key,
                    size=int(info["size"]),
                    version=self.version_of(info),
                )
            )
        return files

    def modified_at(self, path: str) -> float | None:
        """When the file was last written (epoch seconds), or None when it does not exist."""
        try:
            info = self._fs.info(path)
        except FileNotFoundError:
            return None
        stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
        return stamp.timestamp() if hasattr(stamp, "timestamp") else (float(stamp) if stamp is not None else None)

    def version_of(self, info: dict[str, Any]) -> str:
        """A tag that changes when the file's content changes (local: size + mtime)."""
        mtime = info.get("mtime") or info.get("created") or 0
        return f"{int(info['size'])}-{int(float(mtime) * 1e9)}"

    def delete(self, path: str) -> None:
        try:
            self._fs.rm_file(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise os_failure(err, "deleting", path) from None

    def _key(self, path: str) -> str:
        """``path`` as fsspec lists it (no scheme)."""
        return self._fs._strip_protocol(path)

    # -- commit primitives (backend specific) -------------------------------------------
    @abstractmethod
    def write_atomic(self, path: str, data: bytes) -> None: ...

    @abstractmethod
    def create_exclusive(self, path: str, data: bytes) -> bool: ...

    @abstractmethod
    def remove_if_unchanged(self, path: str, expected: bytes) -> bool:
        """Delete ``path`` if it still holds ``expected``; False (and the file kept) when it
        holds something else or is gone."""

    @abstractmethod
    def open_staged(self, final_path: str) -> StagedPart: ...

    @abstractmethod
    def staged_from(self, handle: dict[str, Any]) -> StagedPart:
        """The staged part a sentinel's ``handle`` describes (to publish or abort it)."""

    @abstractmethod
    def list_staged(self, directory: str) -> list[StagedPart]:
        """Staged parts whose final path is directly under ``directory`` (for cleaning up)."""


def os_failure(err: OSError, action: str, path: str) -> StorageError:
    """A StorageError naming the file, the OS error and what to do about it."""
    hint = {
        errno.EACCES: "give the task's user write permission there",
        errno.EPERM: "give the task's user write permission there",
        errno.ENOSPC: "free space on that filesystem",
        errno.EDQUOT: "raise the quota or free space",
        errno.EROFS: "mount the filesystem read-write",
        errno.EISDIR: "move away the directory in the way",
        errno.ENOTDIR: "a file stands where a directory should be: move it away or fix the path",
    }.get(err.errno or 0, "check that the filesystem is mounted and writable")
    return StorageError(f"{action} {path} failed: {err.strerror or err} (errno {err.errno}); {hint}, then clear the task")


def input_changed(path: str, what: str) -> InputChangedError:
    """The one message for an input file that is not the version its shard was planned on."""
    return InputChangedError(
        f"input {path} {what} since the plan recorded it; the shard reads only the planned version, "
        "so it failed before committing anything. Clear the plan task (or trigger a new run) to "
        "plan the file as it is now, or restore the file."
    )


def _glob_root(pattern: str) -> str:
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if any(ch in part for ch in _GLOB_CHARS):
            return "/".join(parts[:i])
    return posixpath.dirname(pattern)
