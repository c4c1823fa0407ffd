"""Local-filesystem backend of :class:`~pipeline.job.storage.Storage`."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import StorageError
from pipeline.job.storage import ObjectInfo, Storage, local_etag

__all__ = ["LocalStorage", "local_etag"]


class LocalStorage(Storage):
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every entry at or under ``prefix``; nothing is opened, nothing silently left out.

        A symlink to a file is followed: the target's size and mtime make the identity. A
        directory symlink is listed as an entry but not descended into: no loop, no escape from
        the input folder, no slide listed twice under two names. A dangling symlink, a symlink
        loop, a FIFO, a socket, a device file and a subfolder that cannot be read are listed too,
        with their own ``lstat`` identity, so one of them never aborts the listing: the detect
        stage refuses a slide-named one with its reason, and the job reports the others as
        non-slides. Only an unreadable ``prefix`` itself raises :class:`StorageError`.
        """
        root = Path(prefix)
        if root.is_file():
            st = root.stat()
            yield ObjectInfo(str(root), st.st_size, local_etag(st))
            return
        if not root.is_dir():
            raise StorageError(f"{prefix}: no such directory")

        def entries(folder: Path) -> list[os.DirEntry]:
            with os.scandir(folder) as it:
                return sorted(it, key=lambda e: e.name)

        try:
            stack = [iter(entries(root))]
        except OSError as exc:
            raise StorageError(f"{prefix}: cannot list ({exc.strerror or exc})") from None
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
                continue
            try:
                real_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                real_dir = False
            if real_dir:
                try:
                    stack.append(iter(entries(Path(entry.path))))
                    continue
                except OSError:
                    pass  # listed below as an entry of its own
            try:
                st = os.stat(entry.path)
            except OSError:  # dangling symlink, symlink loop, vanished entry
                try:
                    st = os.lstat(entry.path)
                except OSError:
                    continue  # removed since the folder was read: there is nothing to list
            yield ObjectInfo(entry.path, st.st_size, local_etag(st))

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
            raise StorageError(
                f"{dst}: cannot publish from {src} ({exc.strerror or exc})"
            ) from None

    # -- conditional writes ------------------------------------------------------------------
    # A file has no version the OS would compare for us, so the compare-and-replace steps hold an
    # exclusive flock() on the object's directory: every conditional operation on objects of that
    # directory, in any process on this machine (and on NFS v4 clients), runs one at a time. The
    # token is a hash of the content; a lease record's content carries its renewal time and a
    # random id, so two versions never share a token.
    @staticmethod
    def _token(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:32]

    @contextlib.contextmanager
    def _dir_lock(self, uri: str):
        parent = Path(uri).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(parent, os.O_RDONLY)
        except OSError as exc:
            raise StorageError(f"{uri}: cannot write ({exc.strerror or exc})") from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _read_versioned(self, uri: str, max_bytes: int) -> tuple[bytes, str] | None:
        """The first ``max_bytes + 1`` bytes and the token of the whole file, hashed in pieces
        so that an oversized file is never held in memory."""
        h = hashlib.sha256()
        head = b""
        try:
            with open(uri, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
                    if len(head) <= max_bytes:
                        head += block[: max_bytes + 1 - len(head)]
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"{uri}: cannot read ({exc.strerror or exc})") from None
        return head, h.hexdigest()[:32]

    @contextlib.contextmanager
    def _temp_with(self, uri: str, data: bytes):
        """A synced temporary file beside ``uri`` holding ``data``; removed on exit unless it was
        renamed away. Write failures become a one-line StorageError naming ``uri``."""
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=Path(uri).parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            yield tmp
        except OSError as exc:
            if isinstance(exc, FileExistsError):
                raise
            raise StorageError(f"{uri}: cannot write ({exc.strerror or exc})") from None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def read_versioned(self, uri: str, max_bytes: int) -> tuple[bytes, str] | None:
        return self._read_versioned(uri, max_bytes)

    def create_exclusive(self, uri: str, data: bytes) -> str | None:
        with self._dir_lock(uri):
            try:
                with self._temp_with(uri, data) as tmp:
                    # link() fails when the name exists, and the name appears with its whole content.
                    os.link(tmp, uri)
            except FileExistsError:
                return None
        return self._token(data)

    def replace_if(self, uri: str, data: bytes, token: str) -> str | None:
        with self._dir_lock(uri):
            current = self._read_versioned(uri, 0)
            if current is None or current[1] != token:
                return None
            with self._temp_with(uri, data) as tmp:
                os.replace(tmp, uri)
        return self._token(data)

    def delete_if(self, uri: str, token: str) -> bool:
        with self._dir_lock(uri):
            current = self._read_versioned(uri, 0)
            if current is None or current[1] != token:
                return False
            self.delete(uri)
        return True

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
