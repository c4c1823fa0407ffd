"""TIFF sniffing shared by the backends' dispatch and the remote reader."""

from __future__ import annotations

import itertools
from pathlib import Path

from pipeline.errors import SlideOpenError
from pipeline.slides.base import MAX_TIFF_DIRECTORIES

__all__: list[str] = []

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF


def _is_tiff(path: Path) -> bool:
    """True when ``path`` starts with a (classic or Big) TIFF signature."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _is_tiled_tiff(path: Path) -> bool:
    """True when ``path`` is a TIFF whose first page is tiled (False on any parse problem)."""
    try:
        if not _is_tiff(path):
            return False
        import tifffile

        with tifffile.TiffFile(path) as tf:
            return bool(tf.pages.first.is_tiled)
    except Exception:  # noqa: BLE001 - sniffing only: the real open reports the problem
        return False


def first_pages(tf, uri: object) -> list:
    """The pages of ``tf`` (a ``tifffile.TiffFile``), walking at most
    ``MAX_TIFF_DIRECTORIES + 1`` directories: ``TiffFile.pages`` is lazy, and ``len(pages)``
    would walk a hostile file's whole IFD chain. Raises :class:`SlideOpenError` naming ``uri``
    when there are more."""
    pages = list(itertools.islice(tf.pages, MAX_TIFF_DIRECTORIES + 1))
    if len(pages) > MAX_TIFF_DIRECTORIES:
        raise SlideOpenError(
            uri,
            f"more than {MAX_TIFF_DIRECTORIES} TIFF directories (IFDs): corrupt or hostile file, "
            "not a slide",
        )
    return pages


def check_tiff_directories(path: Path) -> None:
    """Refuse a local TIFF with more than ``MAX_TIFF_DIRECTORIES`` directories, before OpenSlide
    walks them all (:class:`SlideOpenError`); the same rule as the remote reader's, so both
    give one verdict. A TIFF tifffile cannot parse is left to the real open to report."""
    if not _is_tiff(path):
        return
    import tifffile

    try:
        tf = tifffile.TiffFile(path)
    except Exception:  # noqa: BLE001 - the real open reports a damaged header
        return
    try:
        first_pages(tf, path)
    except SlideOpenError:
        raise
    except Exception:  # noqa: BLE001 - a damaged later IFD: the real open reports it
        return
    finally:
        tf.close()
