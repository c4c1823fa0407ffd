"""S3 backend of :class:`~pipeline.job.storage.Storage` (AWS, MinIO, Ceph RGW, moto, ...).

The client comes from boto3's standard chain (environment, profiles, instance roles, IRSA);
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` are honoured by botocore and ``S3Settings.endpoint``
overrides them. Transient errors are retried by botocore's ``standard`` mode (exponential backoff
with jitter, ``max_attempts`` in all); staging uses the managed transfer (parallel ranged GETs).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import StorageError
from pipeline.job.storage import ObjectInfo, S3Settings, Storage, split_s3

__all__ = ["S3Storage", "shared_client"]


def _cause(exc: BaseException) -> str:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error", {})
        code = err.get("Code", "")
        msg = err.get("Message", "")
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        text = " ".join(str(x) for x in (code, msg) if x) or "error"
        return f"{text} (HTTP {status})" if status else text
    return " ".join(str(exc).split()) or type(exc).__name__


def _status(exc: BaseException) -> tuple[int | None, str]:
    """``(HTTP status, S3 error code)`` of a botocore error; ``(None, "")`` for other errors."""
    resp = getattr(exc, "response", None)
    if not isinstance(resp, dict):
        return None, ""
    return resp.get("ResponseMetadata", {}).get("HTTPStatusCode"), str(
        resp.get("Error", {}).get("Code", "")
    )


def _no_such_key(exc: BaseException) -> bool:
    status, code = _status(exc)
    # A HEAD-style 404 has no body, hence no code; a missing bucket is an error, not "absent".
    return status == 404 and code in ("NoSuchKey", "404", "NotFound", "")


def _condition_failed(exc: BaseException) -> bool:
    """412 PreconditionFailed: the condition did not hold; 409 ConditionalRequestConflict: another
    conditional write of the key was in flight and won."""
    status, code = _status(exc)
    return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")


# Environment that decides which credentials and region a new client resolves.
_CLIENT_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def shared_client(settings: S3Settings):
    """One boto3 client per process and configuration (use :func:`pipeline.job.storage.s3_client`).
    Building one costs ~0.1-0.3 s of CPU (a session, the S3 service model): per slide that was a
    fifth of a sample slide's detect task. Clients are thread-safe and refresh expiring
    credentials themselves; a change of the credential environment gets a new client."""
    endpoint = settings.resolved_endpoint
    key = (settings, endpoint, hash(tuple(os.environ.get(k) for k in _CLIENT_ENV)))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(
                retries={"max_attempts": settings.max_attempts, "mode": "standard"},
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=max(10, 2 * settings.transfer_concurrency),
                # S3-compatible stores on a custom endpoint rarely resolve virtual-host buckets.
                s3={"addressing_style": "path" if endpoint else "auto"},
            )
            client = boto3.session.Session().client(
                "s3", endpoint_url=settings.endpoint, region_name=settings.region, config=cfg
            )
            _clients[key] = client
        return client


class S3Storage(Storage):
    def __init__(self, settings: S3Settings):
        self.settings = settings
        self._client = None

    def __getstate__(self):
        return {"settings": self.settings, "_client": None}

    @property
    def endpoint(self) -> str | None:
        return self.settings.resolved_endpoint

    @property
    def client(self):
        if self._client is None:
            self._client = shared_client(self.settings)
        return self._client

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        bucket, key = split_s3(prefix)
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(
                        f"s3://{bucket}/{obj['Key']}",
                        int(obj["Size"]),
                        obj.get("ETag", "").strip('"'),
                    )
        except Exception as exc:  # noqa: BLE001 - botocore raises many types; one message
            raise StorageError(f"{prefix}: cannot list ({_cause(exc)})") from None

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = split_s3(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{uri}: cannot read ({_cause(exc)})") from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = split_s3(uri)
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{uri}: cannot write ({_cause(exc)})") from None

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:  # noqa: BLE001
            status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                return False
            raise StorageError(f"{uri}: cannot check existence ({_cause(exc)})") from None

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{uri}: cannot delete ({_cause(exc)})") from None

    def publish(self, src: str, dst: str) -> None:
        sb, sk = split_s3(src)
        db, dk = split_s3(dst)
        if not self.exists(src):
            if self.exists(dst):
                return
            raise StorageError(f"{src}: staged object missing and {dst} not published")
        try:
            # CopyObject is atomic for the destination: readers see the old state or the whole file.
            self.client.copy({"Bucket": sb, "Key": sk}, db, dk)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{dst}: cannot publish from {src} ({_cause(exc)})") from None
        self.delete(src)

    # -- conditional writes (AWS S3 since 2024, MinIO, Ceph RGW, moto >= 5) ---------------------
    def read_versioned(self, uri: str, max_bytes: int) -> tuple[bytes, str] | None:
        bucket, key = split_s3(uri)
        try:
            try:
                resp = self.client.get_object(
                    Bucket=bucket, Key=key, Range=f"bytes=0-{int(max_bytes)}"
                )
            except Exception as exc:  # noqa: BLE001
                if _status(exc)[0] != 416:
                    raise
                resp = self.client.get_object(
                    Bucket=bucket, Key=key
                )  # an empty object has no byte 0
            return resp["Body"].read(max_bytes + 1), resp.get("ETag", "").strip('"')
        except Exception as exc:  # noqa: BLE001
            if _no_such_key(exc):
                return None
            raise StorageError(f"{uri}: cannot read ({_cause(exc)})") from None

    def create_exclusive(self, uri: str, data: bytes) -> str | None:
        bucket, key = split_s3(uri)
        try:
            resp = self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as exc:  # noqa: BLE001
            if _condition_failed(exc):
                return None
            raise StorageError(f"{uri}: cannot write ({_cause(exc)})") from None
        return resp.get("ETag", "").strip('"')

    def replace_if(self, uri: str, data: bytes, token: str) -> str | None:
        bucket, key = split_s3(uri)
        try:
            resp = self.client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=f'"{token}"')
        except Exception as exc:  # noqa: BLE001
            if _condition_failed(exc) or _no_such_key(exc):
                return None
            raise StorageError(f"{uri}: cannot write ({_cause(exc)})") from None
        return resp.get("ETag", "").strip('"')

    def delete_if(self, uri: str, token: str) -> bool:
        bucket, key = split_s3(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key, IfMatch=f'"{token}"')
        except Exception as exc:  # noqa: BLE001
            if _condition_failed(exc) or _no_such_key(exc):
                return False
            raise StorageError(f"{uri}: cannot delete ({_cause(exc)})") from None
        return True

    def download(self, uri: str, dest: Path, etag: str | None = None) -> int:
        from boto3.s3.transfer import TransferConfig

        bucket, key = split_s3(uri)
        chunk = self.settings.transfer_chunk_mb * 1024 * 1024
        tcfg = TransferConfig(
            multipart_threshold=chunk,
            multipart_chunksize=chunk,
            max_concurrency=self.settings.transfer_concurrency,
            use_threads=True,
        )
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            if etag:
                # The managed transfer pins its ranged GETs to the ETag of its own HEAD; comparing
                # that ETag with the listed one makes the staged bytes those of the slide's identity.
                current = self.client.head_object(Bucket=bucket, Key=key).get("ETag", "").strip('"')
                if current != etag:
                    raise StorageError(
                        f"{uri}: object changed since it was listed (ETag {current} != {etag})"
                    )
            self.client.download_file(bucket, key, str(dest), Config=tcfg)
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{uri}: download failed ({_cause(exc)})") from None
        return dest.stat().st_size
