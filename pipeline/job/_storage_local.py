"""Local-filesystem backend of :class:`~pipeline.job.storage.Storage`."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import StorageError
from pipeline.job.storage import ObjectInfo, Storage

__all__ = ["LocalStorage", "local_etag"]


def local_etag(st: os.stat_result) -> str:
    """Stand-in for an ETag: changes when the file's size or modification time changes."""
    return hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:32]


class LocalStorage(Storage):
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        root = Path(prefix)
        if root.is_file():
            st = root.stat()
            yield ObjectInfo(str(root), st.st_size, local_etag(st))
            return
        if not root.is_dir():
            raise StorageError(f"{prefix}: no such directory")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                try:
                    st = p.stat()
                except OSError as exc:
                    raise StorageError(f"{p}: cannot stat ({exc.strerror or exc})") from None
                yield ObjectInfo(str(p), st.st_size, local_etag(st))

    def read_bytes(self, uri: str) -> bytes:
        try:
            return Path(uri).read_bytes()
        except OSError as exc:
            raise StorageError(f"{uri}: cannot read ({exc.strerror or exc})") from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        p = Path(uri)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            # The temp name starts with "." so a reader of the directory never sees a partial file.
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=p.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, p)
        except OSError as exc:
            raise StorageError(f"{uri}: cannot write ({exc.strerror or exc})") from None

    def exists(self, uri: str) -> bool:
        return Path(uri).exists()

    def delete(self, uri: str) -> None:
        try:
            Path(uri).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"{uri}: cannot delete ({exc.strerror or exc})") from None

    def publish(self, src: str, dst: str) -> None:
        s, d = Path(src), Path(dst)
        if not s.exists():
            if d.exists():
                return
            raise StorageError(f"{src}: staged file missing and {dst} not published")
        try:
            d.parent.mkdir(parents=True, exist_ok=True)
            os.replace(s, d)
        except OSError as exc:
            raise StorageError(f"{dst}: cannot publish from {src} ({exc.strerror or exc})") from None

    def download(self, uri: str, dest: Path, etag: str | None = None) -> int:
        src = Path(uri)
        try:
            if etag is not None and local_etag(src.stat()) != etag:
                raise StorageError(f"{uri}: changed since it was listed")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            return dest.stat().st_size
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"{uri}: cannot copy ({exc.strerror or exc})") from None
