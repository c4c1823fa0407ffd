"""Deterministic identities: a slide is its URI + ETag + size; a cell is its slide + centroid.

A changed object (new ETag or size) is a new slide; re-running over unchanged objects maps every
cell to the same ``cell_id``, which is what makes re-runs and recoveries comparable row by row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["slide_id", "cell_id", "combined_etag", "chunk_name"]


def slide_id(uri: str, etag: str, size: int) -> str:
    """sha256 of ``uri``, ``etag`` and ``size`` (bytes), first 32 hex chars."""
    return hashlib.sha256(f"{uri}\n{etag}\n{int(size)}".encode()).hexdigest()[:32]


def cell_id(slide: str, centroid_x: float, centroid_y: float) -> str:
    """sha256 of the slide id and the centroid rounded to whole level-0 px, first 32 hex chars."""
    return hashlib.sha256(
        f"{slide}\n{round(float(centroid_x))}\n{round(float(centroid_y))}".encode()
    ).hexdigest()[:32]


def combined_etag(parts: Iterable[tuple[str, str, int]]) -> str:
    """One ETag for a multi-file slide from its parts' ``(relative key, etag, size)``."""
    h = hashlib.sha256()
    for rel, etag, size in sorted(parts):
        h.update(f"{rel}\n{etag}\n{int(size)}\n".encode())
    return h.hexdigest()[:32]


def chunk_name(slide_ids: Iterable[str], model_version: str) -> str:
    """File stem of a committed chunk: the same slides and model always give the same name."""
    h = hashlib.sha256(model_version.encode())
    for sid in sorted(slide_ids):
        h.update(b"\n" + sid.encode())
    return h.hexdigest()[:24]
