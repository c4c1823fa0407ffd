"""Object storage behind one small interface: local directories and S3 (any S3-compatible store).

URIs are ``s3://bucket/key`` or local paths. :func:`storage_for` picks the backend:
:class:`~pipeline.job._storage_local.LocalStorage` or :class:`~pipeline.job._storage_s3.S3Storage`.
Both are picklable (the S3 client is created lazily per process), so a Ray task receives one
inside its closure and opens its own connection.

:class:`S3Settings` is the one description of how to reach S3, and every part that does takes
it: the job's input and output (:func:`storage_for`), the slide factory
(:func:`pipeline.slides.open_slide`), the query/report/cohort readers
(:func:`pipeline.outputs.open_outputs`), the model mirror (as the plain mapping
:meth:`S3Settings.storage_options`, since ``hemblip`` does not import ``pipeline``) and the demo.
Every boto3 client of the pipeline comes from :func:`s3_client`.
"""

from __future__ import annotations

import abc
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.errors import ConfigError

__all__ = [
    "ObjectInfo",
    "Storage",
    "S3Settings",
    "StorageOptions",
    "as_s3_settings",
    "s3_client",
    "storage_for",
    "is_s3",
    "split_s3",
    "join_uri",
    "local_etag",
]


def local_etag(st: os.stat_result) -> str:
    """Stand-in for an ETag of a local file: changes when its size or modification time changes."""
    import hashlib

    return hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object. ``etag`` is unquoted; for local files a hash of size + mtime."""

    uri: str
    size: int  # bytes
    etag: str


# Upper bounds as the job's settings have them (pipeline/job/config.py): a value above is a typo.
_S3_INT_LIMITS = {"max_attempts": 100, "transfer_concurrency": 1024, "transfer_chunk_mb": 5120}
# Keys of a storage-options mapping (fsspec/botocore spellings accepted) -> field.
_OPTION_KEYS = {
    "endpoint": "endpoint",
    "endpoint_url": "endpoint",
    "region": "region",
    "region_name": "region",
    "max_attempts": "max_attempts",
    "transfer_concurrency": "transfer_concurrency",
    "transfer_chunk_mb": "transfer_chunk_mb",
}


@dataclass(frozen=True)
class S3Settings:
    """How to reach S3 (AWS or any S3-compatible store), for every part of the pipeline.

    ``endpoint``: ``http(s)://host[:port]``; None: ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``,
    else AWS. ``max_attempts``: tries of one request (botocore's ``standard`` retry mode, and
    pyarrow's). ``transfer_concurrency``/``transfer_chunk_mb`` (MiB): parallel ranged GETs of a
    staged download. ``region``: None: ``AWS_REGION``/``AWS_DEFAULT_REGION`` or the SDK's
    default. Credentials are never part of it: they come from the standard AWS chain. Invalid
    values raise :class:`~pipeline.errors.ConfigError` naming the setting.
    """

    endpoint: str | None = None
    max_attempts: int = 5
    transfer_concurrency: int = 4
    transfer_chunk_mb: int = 8
    region: str | None = None

    def __post_init__(self) -> None:
        for name, top in _S3_INT_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
                raise ConfigError(
                    f"S3 setting {name} must be an integer in 1..{top}, got {value!r}"
                )
        if self.endpoint is not None:
            _check_endpoint(self.endpoint)
        if self.region is not None and (
            not isinstance(self.region, str) or not re.fullmatch(r"[a-z0-9-]{1,64}", self.region)
        ):
            raise ConfigError(
                f"S3 setting region must be a region name like us-east-1, got {self.region!r}"
            )

    @property
    def resolved_endpoint(self) -> str | None:
        """The endpoint requests go to: ``endpoint``, else the environment's, else None (AWS)."""
        return (
            self.endpoint
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )

    @property
    def resolved_region(self) -> str | None:
        return (
            self.region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or None
        )

    def storage_options(self) -> dict[str, str | int]:
        """These settings as a plain mapping (``endpoint_url``, ``region_name``, ``max_attempts``),
        the form :func:`hemblip.model.load_model` takes; unset values are left out so that the
        receiver's environment fallback applies."""
        out: dict[str, str | int] = {"max_attempts": self.max_attempts}
        if self.endpoint:
            out["endpoint_url"] = self.endpoint
        if self.region:
            out["region_name"] = self.region
        return out

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> S3Settings:
        """Settings from a mapping: keys ``endpoint``/``endpoint_url``, ``region``/``region_name``,
        ``max_attempts``, ``transfer_concurrency``, ``transfer_chunk_mb``; any other key raises
        :class:`~pipeline.errors.ConfigError` (a misspelt key would silently mean "default")."""
        kwargs: dict[str, object] = {}
        for key, value in options.items():
            name = _OPTION_KEYS.get(key) if isinstance(key, str) else None
            if name is None:
                raise ConfigError(
                    f"storage option {key!r} is not known; expected one of {', '.join(_OPTION_KEYS)}"
                )
            if name in kwargs and kwargs[name] != value:
                raise ConfigError(
                    f"storage option {key!r} contradicts another spelling of {name!r}"
                )
            kwargs[name] = value
        return cls(**kwargs)


#: What callers may pass wherever storage settings are taken.
StorageOptions = S3Settings | Mapping[str, object] | None


def as_s3_settings(options: StorageOptions) -> S3Settings:
    """``options`` (an :class:`S3Settings`, a mapping for :meth:`S3Settings.from_options`, or
    None for the defaults) as :class:`S3Settings`."""
    if options is None:
        return S3Settings()
    if isinstance(options, S3Settings):
        return options
    if isinstance(options, Mapping):
        return S3Settings.from_options(options)
    raise ConfigError(
        f"storage options must be S3Settings or a mapping, got {type(options).__name__}"
    )


_HOST = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _check_endpoint(url: object) -> None:
    """``http(s)://host[:port][/path]`` without credentials, query or fragment."""
    from pipeline._redact import has_credentials, redact_url

    if not isinstance(url, str) or not url:
        raise ConfigError(f"--s3-endpoint must be an http(s):// URL, got {url!r}")
    authority = url.partition("://")[2].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if has_credentials(url) or "@" in authority:
        # S3 clients sign with the credential chain and ignore an endpoint's userinfo, so these
        # credentials are never used, and they would be recorded with the settings.
        raise ConfigError(
            f"--s3-endpoint {redact_url(url)!r}: credentials in the endpoint URL are not used by "
            "S3 clients; remove them and use the standard AWS credential chain"
        )
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or "?" in url or "#" in url:
        raise ConfigError(
            f"--s3-endpoint {redact_url(url)!r}: expected http(s)://host[:port] without query or fragment"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise ConfigError(f"--s3-endpoint {redact_url(url)!r}: invalid port") from None
    host = parts.hostname or ""
    if not (":" in host or _HOST.fullmatch(host)):  # an IPv6 literal has been parsed by urlsplit
        raise ConfigError(f"--s3-endpoint {redact_url(url)!r}: missing or invalid host name")


def s3_client(settings: StorageOptions = None):
    """The boto3 S3 client for ``settings``: the one way the pipeline builds one (endpoint,
    region, retries in botocore's ``standard`` mode, connection pool, path-style addressing on a
    custom endpoint). One client per process and configuration, shared (clients are
    thread-safe; building one costs 0.1-0.3 s of CPU); a change of the credential environment
    gets a new one."""
    from pipeline.job._storage_s3 import shared_client

    return shared_client(as_s3_settings(settings))


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    rest = str(uri)[len("s3://") :]
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


def storage_for(uri: str, s3: StorageOptions = None) -> Storage:
    """The backend for ``uri`` (``s3://`` or a local path); ``s3``: see :func:`as_s3_settings`."""
    if is_s3(uri):
        from pipeline.job._storage_s3 import S3Storage

        split_s3(uri)
        return S3Storage(as_s3_settings(s3))
    from pipeline.job._storage_local import LocalStorage

    return LocalStorage()
