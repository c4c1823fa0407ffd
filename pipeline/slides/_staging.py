"""Local files the slide factory opens: checking a local input, staging an S3 slide to scratch.

Everything here handles names that come from outside (object keys, directory entries) and so
treats them as hostile: a staged copy's path is confined to its scratch directory, an over-long
name is shortened where the name does not matter, and a local input is refused, without being
opened, when it is not a regular file (a FIFO blocks whoever opens it; a device may act on it).
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from pipeline.errors import SlideOpenError, StorageError, WorkerEnvironmentError

__all__ = ["PartLike", "check_local_file", "confined_path", "make_scratch_dir", "staged_paths"]

_NAME_MAX = 255  # bytes of one path component on common Linux file systems (ext4, xfs, btrfs)
_PATH_MAX = 4096  # bytes of a whole path (Linux)


class PartLike(Protocol):
    """One object of a slide (:class:`pipeline.job.listing.SlidePart` is one): ``rel`` is its
    path relative to the slide's base folder, ``size`` bytes, ``etag`` as listed (may be "")."""

    uri: str
    rel: str
    size: int
    etag: str


def _name_max(root: Path) -> int:
    try:
        return min(_NAME_MAX, int(os.pathconf(root, "PC_NAME_MAX")))
    except (OSError, ValueError):
        return _NAME_MAX


def _nbytes(name: str) -> int:
    return len(name.encode("utf-8", "surrogateescape"))


def _short_name(comp: str, limit: int) -> str:
    """``comp`` if it fits ``limit`` bytes, else a hash of it plus its suffix (OpenSlide picks
    some formats by suffix); deterministic, and distinct names give distinct results."""
    if _nbytes(comp) <= limit:
        return comp
    digest = hashlib.sha256(comp.encode("utf-8", "surrogateescape")).hexdigest()[:40]
    suffix = os.path.splitext(comp)[1]
    if _nbytes(suffix) > 32 or any(c in suffix for c in "/\\"):
        suffix = ""
    return digest + suffix


def confined_path(root: Path, rel: str, shorten: bool = False) -> Path:
    """``root/rel`` with ``rel`` (an object key, untrusted) kept inside ``root``.

    Empty and ``.`` components are dropped and ``..`` is renamed, so ``a/../../etc/x`` becomes
    ``root/a/%2E%2E/%2E%2E/etc/x``; the resolved result is checked to lie under ``root``.
    ``shorten``: a component longer than the file system's name limit (255 bytes) is replaced by
    a hash of it plus its suffix (for a copy whose name does not matter, e.g. a single-object
    slide). Raises :class:`~pipeline.errors.StorageError` naming the key otherwise.
    """
    limit = _name_max(root) if shorten else None
    parts = []
    for comp in rel.replace("\\", "/").split("/"):
        comp = comp.replace("\x00", "")
        if comp in ("", "."):
            continue
        comp = "%2E%2E" if comp == ".." else comp
        parts.append(_short_name(comp, limit) if limit else comp)
    if not parts:
        raise StorageError(f"{rel!r}: object key has no file name")
    base = root.resolve()
    out = base.joinpath(*parts).resolve()
    if out != base and base not in out.parents:
        raise StorageError(f"{rel!r}: object key escapes the scratch directory")
    return out


_FILE_KINDS = {
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFDIR: "directory",
}


def _listed_as_link(path: Path, etag: str) -> bool:
    """Whether the listing saw ``path`` as the symlink itself (its target unreachable there too):
    the listing falls back to the link's own ``lstat`` identity exactly then."""
    from pipeline.job.storage import local_etag

    try:
        return local_etag(os.lstat(path)) == etag
    except OSError:
        return False


def check_local_file(path: Path, uri: str, etag: str | None = None) -> None:
    """Refuse, with the cause, a local input that is not a readable regular file, without ever
    opening anything but a regular file (O_NONBLOCK, then ``fstat`` of what was opened).

    ``etag``: None for a path given directly (a missing or unreadable file is a
    :class:`SlideOpenError`); the listing's ETag for a slide listed by the job's driver. Then a
    dangling symlink, a symlink loop or a special file is the entry's own problem
    (:class:`SlideOpenError`), and a file this worker cannot see or read is its environment's
    (:class:`WorkerEnvironmentError`): on a multi-node cluster a worker on another node sees only
    file systems its node mounts, so a link whose target the listing reached (``etag`` is the
    target's) but this worker does not is the environment's too.
    """
    listed = etag is not None
    env_error = WorkerEnvironmentError if listed else SlideOpenError
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path) and (not listed or _listed_as_link(path, etag)):
            raise SlideOpenError(
                uri, f"dangling symlink (its target {os.readlink(path)!r} does not exist)"
            ) from None
        if not listed:
            raise SlideOpenError(uri, "no such file") from None
        raise WorkerEnvironmentError(
            uri,
            f"not visible to this worker (host {socket.gethostname()}): no such file; a local input must be "
            "on a file system that every node of the cluster mounts",
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and (not listed or _listed_as_link(path, etag)):
            raise SlideOpenError(uri, "symlink loop") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise env_error(
                uri, "permission denied (a folder on the path cannot be searched)"
            ) from None
        raise env_error(uri, f"cannot stat ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode) and not listed:
        raise SlideOpenError(uri, "is a directory, not a slide file")
    if not stat.S_ISREG(st.st_mode):
        raise SlideOpenError(
            uri, f"not a regular file ({_FILE_KINDS.get(stat.S_IFMT(st.st_mode), 'special file')})"
        )
    try:
        # O_NONBLOCK: should the entry have become a FIFO since the stat, the open cannot block.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise env_error(uri, "permission denied") from None
        raise env_error(uri, f"cannot open ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SlideOpenError(uri, "not a regular file (replaced while being checked)")
    finally:
        os.close(fd)


def make_scratch_dir(scratch_dir: str | os.PathLike | None, label: str) -> Path:
    """A new private directory (mode 0700) under ``scratch_dir`` (default: the system temp
    folder's ``hemblip-scratch``) for one staged slide; ``label`` prefixes its name.
    Raises :class:`WorkerEnvironmentError` when the folder cannot be created there."""
    root = Path(scratch_dir or os.path.join(tempfile.gettempdir(), "hemblip-scratch"))
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)[:12] or "slide"
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{safe}-", dir=root))
    except OSError as exc:
        raise WorkerEnvironmentError(
            root,
            f"scratch directory unusable on host {socket.gethostname()} ({exc.strerror or exc})",
        ) from None


def staged_paths(
    uri: str, parts: Sequence[PartLike], open_rel: str, slide_dir: Path
) -> tuple[list[Path], Path]:
    """Where each part and the file to open go under ``slide_dir``. A single-object slide's name
    does not matter, so an over-long one is shortened; the members of a multi-object slide keep
    their names (its index file refers to them), so an over-long one fails the slide
    (:class:`SlideOpenError` naming ``uri``); a staged path over the local path limit is the
    environment's (:class:`WorkerEnvironmentError`)."""
    single = len(parts) == 1
    if not single:
        limit = _name_max(slide_dir)
        for part in parts:
            for comp in part.rel.replace("\\", "/").split("/"):
                if _nbytes(comp) > limit:
                    shown = part.rel if len(part.rel) <= 80 else part.rel[:80] + "…"
                    raise SlideOpenError(
                        uri,
                        f"member {shown!r}: a name of {_nbytes(comp)} bytes is too long "
                        f"for the local file system ({limit} bytes at most)",
                    )
    dests = [confined_path(slide_dir, p.rel, shorten=single) for p in parts]
    opened = confined_path(slide_dir, open_rel, shorten=single)
    longest = max(_nbytes(str(d)) for d in [*dests, opened])
    if longest >= _PATH_MAX:
        raise WorkerEnvironmentError(
            uri,
            f"staged path of {longest} bytes exceeds the local limit of {_PATH_MAX}; use a shorter --scratch-dir",
        )
    return dests, opened
