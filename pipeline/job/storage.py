"""Object storage behind one small interface: local directories and S3 (any S3-compatible store).

URIs are ``s3://bucket/key`` or local paths. :func:`storage_for` picks the backend:
:class:`~pipeline.job._storage_local.LocalStorage` or :class:`~pipeline.job._storage_s3.S3Storage`.
Both are picklable (the S3 client is created lazily per process), so a Ray task receives one
inside its closure and opens its own connection.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError

__all__ = ["ObjectInfo", "Storage", "S3Settings", "storage_for", "is_s3", "split_s3", "join_uri"]


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object. ``etag`` is unquoted; for local files a hash of size + mtime."""

    uri: str
    size: int  # bytes
    etag: str


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3: ``endpoint`` overrides ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``."""

    endpoint: str | None = None
    max_attempts: int = 5
    transfer_concurrency: int = 4
    transfer_chunk_mb: int = 8


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = str(uri)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ConfigError(f"{uri!r}: missing bucket name (expected s3://bucket/prefix)")
    return bucket, key


def join_uri(base: str, *parts: str) -> str:
    """Join with ``/`` for S3 and the OS separator for local paths."""
    if is_s3(base):
        out = base.rstrip("/")
        for p in parts:
            out += "/" + p.strip("/")
        return out
    return str(Path(base).joinpath(*parts))


class Storage(abc.ABC):
    """Operations the job needs; every failure raises :class:`~pipeline.errors.StorageError`."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object at or under ``prefix`` (recursive), in key order."""

    @abc.abstractmethod
    def read_bytes(self, uri: str) -> bytes: ...

    @abc.abstractmethod
    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a whole object (S3 PUT is atomic; local writes go through a temp file + rename)."""

    @abc.abstractmethod
    def exists(self, uri: str) -> bool: ...

    @abc.abstractmethod
    def delete(self, uri: str) -> None:
        """Delete; a missing object is not an error (deletes are retried by recovery)."""

    @abc.abstractmethod
    def publish(self, src: str, dst: str) -> None:
        """Make ``src`` visible as ``dst`` and remove ``src`` (local: rename; S3: copy + delete).

        Idempotent: when ``src`` is gone and ``dst`` exists the publish already happened.
        """

    # -- conditional writes: the run lease (pipeline/job/lease.py) is built on these four ------
    # A "token" is the object's version as the store reports it (S3: the unquoted ETag; local: a
    # hash of the content). Each write below is atomic: either it happened, as a whole, or not.
    @abc.abstractmethod
    def read_versioned(self, uri: str, max_bytes: int) -> tuple[bytes, str] | None:
        """``(content, token)``, or ``None`` when there is no such object. At most
        ``max_bytes + 1`` bytes are read, so a caller sees an oversized object without holding it."""

    @abc.abstractmethod
    def create_exclusive(self, uri: str, data: bytes) -> str | None:
        """Create ``uri`` only if it does not exist (S3: ``If-None-Match: *``; local: ``link()``).
        Returns the new token, or ``None`` when the object already exists."""

    @abc.abstractmethod
    def replace_if(self, uri: str, data: bytes, token: str) -> str | None:
        """Replace ``uri`` only if its token is still ``token`` (S3: ``If-Match``). Returns the
        new token, or ``None`` when the object changed or is gone."""

    @abc.abstractmethod
    def delete_if(self, uri: str, token: str) -> bool:
        """Delete ``uri`` only if its token is still ``token``; ``False`` when it changed or is gone."""

    @abc.abstractmethod
    def download(self, uri: str, dest: Path, etag: str | None = None) -> int:
        """Copy the object to the local file ``dest``; returns bytes read. With ``etag`` the read
        fails when the object changed since it was listed."""


def storage_for(uri: str, s3: S3Settings | None = None) -> Storage:
    """The backend for ``uri`` (``s3://`` or a local path)."""
    if is_s3(uri):
        from pipeline.job._storage_s3 import S3Storage

        split_s3(uri)
        return S3Storage(s3 or S3Settings())
    from pipeline.job._storage_local import LocalStorage

    return LocalStorage()
