"""The S3 backend of ``Store``: commits without rename or copy.

S3 has no rename (a "move" is a copy plus a delete, neither atomic nor cheap), so the commit
protocol of ``core/domain/commit.py`` maps onto S3 like this:

* **staging** is a multipart upload *at the part's final key* that is not completed yet:
  its bytes are durable on the server but no reader, LIST or GET sees them;
* the **commit point** is the sentinel, written with a conditional create
  (``PutObject`` with ``If-None-Match: *``): of two racing attempts, exactly one gets 200,
  the other 412 ``PreconditionFailed``;
* **publish** is ``CompleteMultipartUpload`` of the winner's upload (the upload id and part
  ETags are in the sentinel's ``staged`` handle, so anyone can roll a crash forward), and
  **abort** is ``AbortMultipartUpload`` of the loser's *own* upload: it never touches the
  object at the key, which may be the winner's.

Requests are counted in the design: listing a prefix is one paginated ``ListObjectsV2``
(1000 keys a page) with a delimiter; existence and size are one ``HEAD``; small files one
``GET``/``PUT``. Listing errors (missing bucket, denied) are raised, never read as "empty".

Reading and source discovery go through s3fs (``fs``), which streams: a Parquet file is read
footer first, then row group by row group in ranged GETs; it is never loaded whole. The
commit primitives use a boto3 client built from the same storage options, one per process
and options (boto3 clients are thread-safe and slow to build).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import IO, Any, Iterator

from airflow_batch_provider.core.errors import StorageError
from airflow_batch_provider.core.stores.base import FileInfo, HashingWriter, StagedPart, Store, input_changed
from airflow_batch_provider.core.stores.urls import split_s3_url
from airflow_batch_provider.core.tunables import S3_CONFLICT_BACKOFF_S, S3_CONFLICT_TRIES, S3_MAX_POOL_CONNECTIONS, S3_PART_SIZE, S3_READ_BLOCK

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def s3_client(storage_options: dict[str, Any]) -> Any:
    """A boto3 S3 client for fsspec/s3fs-style storage options, shared within the process.

    Understands the options s3fs accepts: ``key``, ``secret``,
    ``token``, ``endpoint_url``, ``profile``, ``anon``, ``client_kwargs`` (``region_name``,
    ``verify``...) and ``config_kwargs`` (botocore ``Config``).
    """
    cache_key = json.dumps(storage_options, sort_keys=True, default=str)
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            client = _clients[cache_key] = _build_client(storage_options)
        return client


def _build_client(options: dict[str, Any]) -> Any:
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config_kwargs = {"max_pool_connections": S3_MAX_POOL_CONNECTIONS, **(options.get("config_kwargs") or {})}
    if options.get("anon"):
        config_kwargs["signature_version"] = UNSIGNED
    client_kwargs = dict(options.get("client_kwargs") or {})
    if options.get("endpoint_url"):
        client_kwargs["endpoint_url"] = options["endpoint_url"]
    session = boto3.session.Session(profile_name=options.get("profile"))
    # botocore parses every LastModified of a LIST page with dateutil, most of the time of
    # listing many sentinels (docs/benchmarks.md, "Planning over many committed shards"). ISO 8601 is all S3 sends;
    # parse it natively.
    session._session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_parse_timestamp)
    return session.client(
        "s3",
        aws_access_key_id=options.get("key"),
        aws_secret_access_key=options.get("secret"),
        aws_session_token=options.get("token"),
        config=Config(**config_kwargs),
        **client_kwargs,
    )


def _parse_timestamp(value: str) -> Any:
    """S3's ISO 8601 timestamps via ``datetime.fromisoformat``; anything else via botocore."""
    from datetime import datetime, timezone

    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    except (ValueError, AttributeError):
        from botocore.utils import parse_timestamp

        return parse_timestamp(value)


def _code(err: Exception) -> str:
    response = getattr(err, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _status(err: Exception) -> int:
    response = getattr(err, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _failure(err: Exception, action: str, url: str) -> StorageError:
    """A StorageError that names the object, the S3 error and what to do (never a secret)."""
    code = _code(err) or type(err).__name__
    bucket = split_s3_url(url)[0]
    hint = ""
    if code == "NoSuchBucket":
        hint = f" Bucket {bucket!r} does not exist: create it, or fix the URL."
    elif code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "403"):
        hint = " Check the S3 credentials (the connection or environment they come from)."
    elif type(err).__name__ in ("EndpointConnectionError", "ConnectTimeoutError"):
        hint = " Check the connection's endpoint_url and that the S3 server is reachable."
    response = getattr(err, "response", None)
    message = (response or {}).get("Error", {}).get("Message") if response else str(err)
    return StorageError(f"S3 {action} of {url} failed: {code}: {message}.{hint}")


class S3StagedPart(StagedPart):
    """A multipart upload at the part's final key, not completed yet.

    Written parts are buffered to ``part_size`` and uploaded one by one; the upload is created
    with the first part, so a shard that fails before writing anything leaves none behind.
    ``publish`` completes the upload, ``abort`` aborts it (never the object at the key).
    """

    def __init__(self, client: Any, bucket: str, key: str, *, upload_id: str | None = None,
                 parts: list[dict[str, Any]] | None = None, part_size: int = 0):
        self._client = client
        self.bucket, self.key = bucket, key
        self.final_path = f"s3://{bucket}/{key}"
        self.upload_id = upload_id
        self.parts = list(parts or [])
        self._part_size = part_size
        self._buffer = bytearray()
        self.stream = HashingWriter(self)  # type: ignore[arg-type]
        self.closed = False

    @property
    def handle(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "key": self.key, "upload_id": self.upload_id, "parts": list(self.parts)}

    # -- the raw stream under ``stream`` ----------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buffer += data
        while len(self._buffer) >= self._part_size:
            chunk = bytes(self._buffer[: self._part_size])
            del self._buffer[: self._part_size]
            self._upload(chunk)
        return len(data)

    def flush(self) -> None:  # parts go out when full; the last one in finish()
        pass

    def finish(self) -> None:
        """Upload the last (possibly small, possibly only) part."""
        if self._buffer or not self.parts:
            chunk, self._buffer = bytes(self._buffer), bytearray()
            self._upload(chunk)
        self.closed = True

    def _upload(self, chunk: bytes) -> None:
        try:
            if self.upload_id is None:
                self.upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=self.key)["UploadId"]
            number = len(self.parts) + 1
            response = self._client.upload_part(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=chunk
            )
        except Exception as err:
            if _code(err) or type(err).__module__.startswith("botocore"):
                raise _failure(err, "multipart upload", self.final_path) from None
            raise
        self.parts.append({"PartNumber": number, "ETag": response["ETag"]})

    # -- publish / abort --------------------------------------------------------------------
    def publish(self) -> bool:
        """``CompleteMultipartUpload``; idempotent (an upload completed before is fine)."""
        if self.upload_id:
            try:
                self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in self.parts]},
                )
                return True
            except Exception as err:
                if _code(err) != "NoSuchUpload":
                    raise _failure(err, "CompleteMultipartUpload", self.final_path) from None
        # The upload is gone: completed by an earlier publish (then the object is there), or
        # aborted (the caller sees the part missing and quarantines the sentinel).
        return _head(self._client, self.final_path) is not None

    def last_activity(self) -> float | None:
        """The newest part's upload time (``ListParts``), else when the upload began: a long
        shard keeps uploading parts, so its upload stays young however long ago it began."""
        if not self.upload_id:
            return self.started_at
        try:
            parts = self._client.list_parts(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id).get("Parts", ())
        except Exception as err:
            if _code(err) in ("NoSuchUpload", "404"):
                return None
            raise _failure(err, "ListParts", self.final_path) from None
        stamps = [p["LastModified"].timestamp() for p in parts if hasattr(p.get("LastModified"), "timestamp")]
        return max(stamps + ([self.started_at] if self.started_at else []), default=None)

    def abort(self) -> None:
        """Abort this attempt's upload; the object at the key (maybe the winner's) stays."""
        self.closed = True
        if not self.upload_id:
            return
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
        except Exception as err:
            if _code(err) not in ("NoSuchUpload", "404"):
                raise _failure(err, "AbortMultipartUpload", self.final_path) from None


def etag_of(version: str) -> str:
    """The ETag in a version tag of :meth:`S3Store.version_of` (``{etag}-{size}[@{version id}]``)."""
    return version.split("@", 1)[0].rpartition("-")[0]


def _precondition_failed(err: BaseException) -> bool:
    """Whether s3fs / botocore failed a request for its ``If-Match`` (HTTP 412)."""
    seen: BaseException | None = err
    while seen is not None:
        if _code(seen) == "PreconditionFailed" or _status(seen) == 412 or type(seen).__name__ == "FileExpired":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _head(client: Any, path: str) -> dict[str, Any] | None:
    bucket, key = split_s3_url(path)
    try:
        return client.head_object(Bucket=bucket, Key=key)
    except Exception as err:
        if _code(err) in ("NoSuchKey", "404", "NotFound"):
            return None
        raise _failure(err, "HEAD", path) from None


class S3Store(Store):
    """Objects under ``s3://bucket/prefix``; see the module docstring for the commit mapping.

    :param storage_options: s3fs-style options (``hooks.storage.storage_options_for()``).
    :param part_size: multipart part size in bytes (>= 5 MiB on AWS; tests use less).
    """

    def __init__(self, storage_options: dict[str, Any], *, part_size: int = S3_PART_SIZE):
        import s3fs

        options = dict(storage_options)
        # Our own writes go through boto3, so a cached listing in s3fs would be stale.
        super().__init__(s3fs.S3FileSystem(**{"use_listings_cache": False, **options}))
        self.client = s3_client(options)
        self.part_size = part_size

    # -- reading -----------------------------------------------------------------------
    def open_read(self, path: str, size: int | None = None) -> IO[bytes]:
        # With the size known s3fs sends no HEAD; a file changed since it was listed is then
        # refused when a shard reads it (``read_pinned``), as one changed after planning is.
        return self._fs.open(path, "rb", block_size=S3_READ_BLOCK, cache_type="readahead", size=size)

    @contextlib.contextmanager
    def read_pinned(self, path: str, version: str) -> Iterator[IO[bytes]]:
        """Every GET of the read is conditional on the ETag the plan recorded: s3fs sends
        each ranged GET of an open file with ``If-Match`` on the ETag its HEAD saw at open,
        which must be the planned one. An object overwritten after the plan is refused at
        open; one overwritten while it is read answers 412 (s3fs: ``FileExpired``), never new
        bytes."""
        etag = etag_of(version)
        try:
            handle = self._fs.open(path, "rb", block_size=S3_READ_BLOCK, cache_type="readahead")
        except FileNotFoundError:
            raise input_changed(path, "is gone") from None
        with handle:
            now = str(handle.details.get("ETag", "")).strip('"')
            if now != etag:
                raise input_changed(path, f"changed (ETag {etag} when planned, {now} now)")
            try:
                yield handle
            except OSError as err:
                if _precondition_failed(err):
                    raise input_changed(path, f"changed while it was read (ETag {etag} when planned)") from None
                raise

    def read_bytes(self, path: str) -> bytes | None:
        bucket, key = split_s3_url(path)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as err:
            if _code(err) in ("NoSuchKey", "404"):
                return None
            raise _failure(err, "GET", path) from None

    def exists(self, path: str) -> bool:
        return _head(self.client, path) is not None

    def size(self, path: str) -> int | None:
        head = _head(self.client, path)
        return None if head is None else int(head["ContentLength"])

    def list_files(self, prefix: str) -> dict[str, FileInfo]:
        """Objects directly under ``prefix``: one paginated LIST with a ``/`` delimiter.

        An empty or absent prefix is ``{}``; a missing bucket or a denied LIST raises.
        """
        bucket, key = split_s3_url(prefix)
        key = f"{key.rstrip('/')}/" if key else ""
        files: dict[str, FileInfo] = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=key, Delimiter="/", PaginationConfig={"PageSize": 1000}
            )
            for page in pages:
                for entry in page.get("Contents", ()):
                    name = entry["Key"][len(key) :]
                    if name:
                        files[name] = FileInfo(name=name, size=int(entry["Size"]), version=self.version_of(entry))
        except StorageError:
            raise
        except Exception as err:
            raise _failure(err, "LIST", prefix) from None
        return files

    def version_of(self, info: dict[str, Any]) -> str:
        """ETag + size (+ version id on versioned buckets): changes with the content."""
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        size = int(info.get("size", info.get("Size", 0)) or 0)
        version_id = info.get("VersionId") or info.get("version_id")
        tag = f"{etag}-{size}"
        return f"{tag}@{version_id}" if version_id and version_id != "null" else tag

    def modified_at(self, path: str) -> float | None:
        head = _head(self.client, path)
        return None if head is None else head["LastModified"].timestamp()

    def delete(self, path: str) -> None:
        bucket, key = split_s3_url(path)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except Exception as err:
            if _code(err) not in ("NoSuchKey", "404"):
                raise _failure(err, "DELETE", path) from None

    # -- commit primitives ----------------------------------------------------------------
    def write_atomic(self, path: str, data: bytes) -> None:
        """One PUT: S3 replaces an object atomically (readers see old or new, never half)."""
        bucket, key = split_s3_url(path)
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as err:
            raise _failure(err, "PUT", path) from None

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Conditional create (``If-None-Match: *``): True for the one writer that wins.

        412 ``PreconditionFailed``: the object exists, we lost. 409
        ``ConditionalRequestConflict``: another conditional write is in flight; S3 asks to
        retry, which then answers 412 (it won) or 200 (it failed). Still undecided after a
        few tries is a ``StorageError`` (the task fails and its retry decides it).

        A botocore retry of a PUT whose first try did succeed answers 412 to its own create:
        the caller recognises its own content (the attempt token) after a False.
        """
        bucket, key = split_s3_url(path)
        for attempt in range(S3_CONFLICT_TRIES):
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except Exception as err:
                code, status = _code(err), _status(err)
                if code == "PreconditionFailed" or status == 412:
                    return False
                if code == "ConditionalRequestConflict" or status == 409:
                    time.sleep(S3_CONFLICT_BACKOFF_S * (attempt + 1))
                    continue
                raise _failure(err, "conditional PUT", path) from None
        raise StorageError(
            f"S3 conditional PUT of {path} still answered 409 ConditionalRequestConflict after "
            f"{S3_CONFLICT_TRIES} tries (another writer keeps racing for it); retry the task: it "
            "finds the shard committed by the other writer, or commits it"
        )

    def remove_if_unchanged(self, path: str, expected: bytes) -> bool:
        """GET (body and ETag), compare, then ``DeleteObject`` with ``If-Match`` on that ETag:
        an object replaced in between is kept (412)."""
        bucket, key = split_s3_url(path)
        try:
            got = self.client.get_object(Bucket=bucket, Key=key)
            body, etag = got["Body"].read(), got["ETag"]
        except Exception as err:
            if _code(err) in ("NoSuchKey", "404"):
                return False
            raise _failure(err, "GET", path) from None
        if body != expected:
            return False
        try:
            self.client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)
        except Exception as err:
            if _code(err) == "PreconditionFailed" or _status(err) == 412:
                return False
            if _code(err) in ("NoSuchKey", "404"):
                return False
            raise _failure(err, "conditional DELETE", path) from None
        return True

    def open_staged(self, final_path: str) -> S3StagedPart:
        bucket, key = split_s3_url(final_path)
        return S3StagedPart(self.client, bucket, key, part_size=self.part_size)

    def staged_from(self, handle: dict[str, Any]) -> S3StagedPart:
        return S3StagedPart(self.client, handle["bucket"], handle["key"], upload_id=handle.get("upload_id"), parts=handle.get("parts"))

    def list_staged(self, directory: str) -> list[StagedPart]:
        """Uncompleted multipart uploads of keys directly under ``directory`` (paginated)."""
        bucket, key = split_s3_url(directory)
        prefix = f"{key.rstrip('/')}/" if key else ""
        staged: list[StagedPart] = []
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                for upload in page.get("Uploads", ()):
                    part = S3StagedPart(self.client, bucket, upload["Key"], upload_id=upload["UploadId"])
                    initiated = upload.get("Initiated")
                    part.started_at = initiated.timestamp() if hasattr(initiated, "timestamp") else None
                    staged.append(part)
        except Exception as err:
            raise _failure(err, "ListMultipartUploads", directory) from None
        return staged
