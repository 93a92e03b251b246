"""URL parsing for every store, in one place: which backend serves a URL, and S3 bucket/key."""

from __future__ import annotations

from airflow_batch_provider.core.errors import BatchSpecError

#: the URL schemes the S3 store serves (``s3a://`` is Hadoop's name for the same objects)
S3_SCHEMES = ("s3", "s3a")


def protocol_of(url: str) -> str:
    """``s3`` for ``s3://`` and ``s3a://`` URLs, ``file`` for local paths and ``file://`` URLs."""
    if "://" not in url:
        return "file"
    scheme = url.split("://", 1)[0].lower()
    return "s3" if scheme in S3_SCHEMES else scheme


def is_remote(url: str) -> bool:
    """Whether ``url`` lives on an object store (credentials needed), not on local disk."""
    return protocol_of(url) != "file"


def check_location(url: str, what: str) -> str:
    """``url`` when a store serves it; else a one-line error (``gs://``, an ``s3://`` without bucket)."""
    protocol = protocol_of(url)
    if protocol == "s3":
        try:
            split_s3_url(url)
        except ValueError:
            raise BatchSpecError(f"{what} {url!r} names no bucket: write s3://bucket/prefix") from None
    elif protocol != "file":
        raise BatchSpecError(f"{what} {url!r}: {protocol}:// is not supported; use a local path or s3://bucket/prefix")
    return url


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> (``bucket``, ``some/key``)."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() not in S3_SCHEMES:
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket, _, key = (rest if sep else url).partition("/")
    if not bucket:
        raise ValueError(f"{url!r}: no bucket name; expected s3://bucket/prefix")
    return bucket, key


def with_scheme_of(url: str, key: str) -> str:
    """``key`` (a path without scheme, as fsspec lists it) addressed like ``url``."""
    if is_remote(url):
        return f"{url.split('://', 1)[0]}://{key}"
    return key


def local_path_of(url: str) -> str:
    """A ``file://`` URL as the plain path it names (``file:///data/x`` -> ``/data/x``);
    any other URL or path unchanged. Local stores and part names work on plain paths."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "file":
        return url
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost"):
        raise ValueError(f"{url!r}: a file:// URL must name a local absolute path (file:///path), not host {host!r}")
    return "/" + path if slash else "/"
