"""Turning names that come from outside (object keys, index entries, dataset rows) into local paths.

Every such name is hostile until checked: ``..``, absolute paths, backslashes (a separator on
Windows), NUL and empty components (``a//b``, which S3 keeps but a file system collapses) are
refused rather than rewritten, because a rewritten name no longer says which file was meant.
Where the file system itself may hold symlinks planted by someone else (the model cache), the
resolved path is checked too.
"""

from __future__ import annotations

import re
from pathlib import Path

from hemblip.errors import HemblipError

__all__ = [
    "UnsafePathError",
    "create_dirs_inside",
    "dataset_path",
    "inside",
    "name_problem",
    "safe_join",
]

_DRIVE = re.compile(r"^[A-Za-z]:")


class UnsafePathError(HemblipError, ValueError):
    """A name from data would point outside the folder it is meant for (message: the reason)."""


def name_problem(rel: object) -> str | None:
    """Why ``rel`` cannot name a file below a folder, or None when it can.

    ``rel`` is a ``/``-separated relative name; see the module docstring for what is refused.
    """
    if not isinstance(rel, str):
        return f"not a string ({type(rel).__name__})"
    if not rel:
        return "empty name"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in rel):
        return "control character (NUL, newline, ...) in the name"
    if "\\" in rel:
        return "backslash in the name"
    if rel.startswith("/"):
        return "absolute path"
    for comp in rel.split("/"):
        if comp == "":
            return "empty path component ('//' or a trailing '/')"
        if comp in (".", ".."):
            return f"'{comp}' path component"
        if _DRIVE.match(comp):  # Windows joins 'a' / 'C:x' to 'C:x', dropping 'a'
            return f"drive-qualified path component {comp!r}"
    return None


def inside(root: Path, path: Path) -> bool:
    """True when ``path``, with every symlink resolved, is ``root`` or lies below it (resolved)."""
    base = Path(root).resolve()
    out = Path(path).resolve()
    return out == base or base in out.parents


def safe_join(root: Path, rel: object, *, resolve: bool = True) -> Path:
    """``root / rel`` for an untrusted ``rel``; raises :class:`UnsafePathError` naming the reason.

    With ``resolve`` the result must also stay below ``root`` after resolving symlinks (use it
    where the folder's contents are not the caller's own, e.g. a download cache).
    """
    problem = name_problem(rel)
    if problem:
        raise UnsafePathError(problem)
    out = Path(root).joinpath(*str(rel).split("/"))
    if resolve and not inside(root, out):
        raise UnsafePathError(f"resolves outside {root} (symlink)")
    return out


def create_dirs_inside(root: Path, parts: tuple[str, ...] | list[str]) -> Path:
    """Create ``root/parts[0]/parts[1]/...`` one level at a time; returns the last folder.

    ``mkdir(parents=True)`` follows a symlinked component and would create folders wherever it
    points; here an existing component that is a symlink or not a folder is refused instead
    (:class:`UnsafePathError`). ``root`` itself must exist and is trusted.
    """
    cur = Path(root)
    for comp in parts:
        problem = name_problem(comp)
        if problem or "/" in comp:
            raise UnsafePathError(problem or "'/' inside one path component")
        cur = cur / comp
        if cur.is_symlink():
            raise UnsafePathError(f"{cur} is a symlink")
        try:
            cur.mkdir()
        except FileExistsError:
            if not cur.is_dir() or cur.is_symlink():
                raise UnsafePathError(f"{cur} exists and is not a folder") from None
    return cur


def dataset_path(root: Path, rel: object) -> Path:
    """``root/rel`` for an image named by a dataset row (CSV cell, COCO ``file_name``).

    Raises :class:`~hemblip.errors.DatasetError` (one line, naming the value and the reason) when
    ``rel`` is absolute or climbs out of ``root``; the caller adds the file and row. Only the name
    is checked, not symlinks: links inside a dataset folder are its owner's choice (e.g. images
    kept on another disk), whereas the row is data that may come from anywhere.
    """
    from hemblip.errors import DatasetError

    try:
        return safe_join(root, rel, resolve=False)
    except UnsafePathError as exc:
        raise DatasetError(
            f"image path {rel!r} is refused ({exc}); image paths must be relative "
            f"to the image root {root} and stay inside it"
        ) from None
