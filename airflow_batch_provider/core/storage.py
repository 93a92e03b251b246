"""Where files live, and the few write primitives the commit protocol is built on.

Reading and listing go through fsspec for every backend. Committing progress needs three
primitives that fsspec does not offer with the guarantees we need, so each backend
implements them itself:

* ``create_exclusive(path, data)``: create a small file only if it does not exist, atomically
  (the commit point of a shard: exactly one attempt can win it).
* ``open_staged(final_path)``: stream a part so that it is durable but not yet visible at
  ``final_path``; ``publish(handle)`` makes it visible, ``discard(handle)`` throws it away.
  ``handle`` is JSON-able and stored in the sentinel, so a crash between commit and publish
  is rolled forward by whoever reads the sentinel next.
* ``write_atomic(path, data)``: replace a small file (plan, manifest) all at once.

On local disk staging is a hidden temp file + fsync, published with ``os.replace``; the
create-only write is temp + fsync + ``os.link``. The S3 store (``core/s3.py``) stages a
multipart upload and commits with a conditional PUT, never renaming or copying.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import uuid
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Iterator

import fsspec

STAGING_DIR = "_staging"


@dataclass(frozen=True)
class FileInfo:
    """One listed file: its name relative to the listed prefix, size, and version tag."""

    name: str
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


class StagedPart:
    """A part being written; durable after ``finish()``, visible only after ``publish``."""

    def __init__(self, store: Store, final_path: str, raw: BinaryIO, handle: dict[str, Any]):
        self.store = store
        self.final_path = final_path
        self.handle = handle
        self.stream = HashingWriter(raw)
        self._raw = raw

    def finish(self) -> None:
        self.store._finish_staged(self._raw, self.handle)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._raw.close()
        self.store.discard(self.handle)


class Store:
    """A directory tree on some filesystem, addressed by URL or local path."""

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self.fs = fs

    # -- paths -------------------------------------------------------------------------
    @staticmethod
    def join(*parts: str) -> str:
        return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)

    # -- reading -----------------------------------------------------------------------
    def open_read(self, path: str) -> IO[bytes]:
        return self.fs.open(path, "rb")

    def read_bytes(self, path: str) -> bytes | None:
        """File content, or None when it does not exist."""
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def size(self, path: str) -> int | None:
        try:
            return int(self.fs.info(path)["size"])
        except FileNotFoundError:
            return None

    def list_files(self, prefix: str) -> dict[str, FileInfo]:
        """Files directly under ``prefix`` (not recursive), by base name. Errors propagate."""
        try:
            entries = self.fs.ls(prefix, detail=True)
        except FileNotFoundError:
            return {}
        files = {}
        for entry in entries:
            if entry.get("type") != "file":
                continue
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            files[name] = FileInfo(name=name, size=int(entry["size"]), version=self.version_of(entry))
        return files

    def version_of(self, info: dict[str, Any]) -> str:
        """A tag that changes when the file's content changes (local: size + mtime)."""
        mtime = info.get("mtime") or info.get("created") or 0
        return f"{int(info['size'])}-{int(float(mtime) * 1e9)}"

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    # -- commit primitives (backend specific) -------------------------------------------
    def write_atomic(self, path: str, data: bytes) -> None:
        raise NotImplementedError

    def create_exclusive(self, path: str, data: bytes) -> bool:
        raise NotImplementedError

    def open_staged(self, final_path: str) -> StagedPart:
        raise NotImplementedError

    def _finish_staged(self, raw: BinaryIO, handle: dict[str, Any]) -> None:
        raise NotImplementedError

    def publish(self, handle: dict[str, Any]) -> bool:
        """Make a staged part visible at its final path. False if its data is gone."""
        raise NotImplementedError

    def discard(self, handle: dict[str, Any]) -> None:
        raise NotImplementedError

    def list_staged(self, sink: str) -> list[dict[str, Any]]:
        """Handles of staged parts under ``sink`` (for garbage collection)."""
        raise NotImplementedError


class LocalStore(Store):
    """Local (or NFS-style POSIX) disk: temp files, fsync, link and rename."""

    def __init__(self) -> None:
        super().__init__(fsspec.filesystem("file"))

    def write_atomic(self, path: str, data: bytes) -> None:
        tmp = self._write_temp(path, data)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))

    def create_exclusive(self, path: str, data: bytes) -> bool:
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        _fsync_dir(os.path.dirname(path))
        return True

    def open_staged(self, final_path: str) -> StagedPart:
        sink, name = os.path.split(final_path)
        staging = os.path.join(sink, STAGING_DIR)
        os.makedirs(staging, exist_ok=True)
        staged = os.path.join(staging, f"{name}.{uuid.uuid4().hex[:12]}.inprogress")
        raw = open(staged, "xb")  # noqa: SIM115 - closed by _finish_staged / abort
        return StagedPart(self, final_path, raw, {"kind": "local", "staged": staged, "final": final_path})

    def _finish_staged(self, raw: BinaryIO, handle: dict[str, Any]) -> None:
        raw.flush()
        os.fsync(raw.fileno())
        raw.close()

    def publish(self, handle: dict[str, Any]) -> bool:
        try:
            os.replace(handle["staged"], handle["final"])
        except FileNotFoundError:
            # Already published by an earlier attempt (or its data is gone): the caller
            # tells the two apart by checking the final file against the sentinel.
            return os.path.exists(handle["final"])
        _fsync_dir(os.path.dirname(handle["final"]))
        return True

    def discard(self, handle: dict[str, Any]) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle["staged"])

    def list_staged(self, sink: str) -> list[dict[str, Any]]:
        staging = os.path.join(sink, STAGING_DIR)
        handles = []
        for name in self.list_files(staging):
            final_name = name.rsplit(".", 2)[0]
            handles.append(
                {"kind": "local", "staged": os.path.join(staging, name), "final": os.path.join(sink, final_name)}
            )
        return handles

    @staticmethod
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


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


_S3_SCHEMES = ("s3", "s3a")


def split_conn_id(url: str) -> tuple[str, str | None]:
    """``s3://conn_id@bucket/key`` (Airflow's ObjectStoragePath form) -> (``s3://bucket/key``, conn_id).

    URLs without a connection id, and non-S3 URLs, come back unchanged with None. Bucket
    names cannot hold ``@``, so the split is unambiguous.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _S3_SCHEMES:
        return url, None
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return url, None
    conn_id, _, bucket = authority.rpartition("@")
    return f"{scheme}://{bucket}{slash}{path}", conn_id or None


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> (``bucket``, ``some/key``)."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() not in _S3_SCHEMES:
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket, _, key = (rest if sep else url).partition("/")
    if not bucket:
        raise ValueError(f"{url!r}: no bucket name; expected s3://bucket/prefix")
    return bucket, key


def store_for(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    """The store that serves ``url`` (a local path, ``file://`` or ``s3://`` URL)."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in _S3_SCHEMES:
        from airflow_batch_provider.core.s3 import S3Store

        return S3Store(storage_options or {})
    if protocol == "file":
        return LocalStore()
    raise ValueError(f"{url!r}: unsupported storage protocol {protocol!r}; use a local path or s3://")


def local_path(url: str) -> str:
    """Strip ``file://`` so local paths work with os functions."""
    return url[len("file://") :] if url.startswith("file://") else url


@contextlib.contextmanager
def opened(store: Store, path: str) -> Iterator[IO[bytes]]:
    handle = store.open_read(path)
    try:
        yield handle
    finally:
        handle.close()
