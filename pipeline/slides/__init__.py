"""Open any whole slide or smear image behind one interface.

``open_slide(path)`` returns a :class:`Slide` (a context manager): OpenSlide formats through the
OpenSlide backend, plain images through the Pillow backend. Errors are
:class:`pipeline.errors.SlideError` subclasses whose text is ``"<path>: <cause>"``.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import SlideOpenError
from pipeline.slides._remote_tiff import open_remote_slide
from pipeline.slides._tiff import _is_tiled_tiff, check_tiff_directories
from pipeline.slides.base import (
    DEFAULT_MAX_DECODE_MB,
    DEFAULT_MAX_PIXELS,
    MAX_SIDE_PX,
    MAX_TIFF_DIRECTORIES,
    Slide,
    check_open_args,
    decode_budget_bytes,
)

__all__ = [
    "open_slide",
    "open_remote_slide",
    "Slide",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_DECODE_MB",
    "MAX_SIDE_PX",
    "MAX_TIFF_DIRECTORIES",
]


def open_slide(
    path: str | os.PathLike,
    mpp: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decode_mb: float = DEFAULT_MAX_DECODE_MB,
) -> Slide:
    """Open ``path`` (a local file) as a :class:`Slide`.

    ``mpp``: level-0 µm/px to use when the file records none (``mpp_source`` becomes "user").
    ``max_pixels``: refuse plain images declaring more level-0 pixels than this, and any single
    read larger than this (:class:`~pipeline.errors.SlideTooLargeError`).
    ``max_decode_mb``: memory budget in MiB of any one decode, checked from the header before
    decoding: a plain image decoded whole, one tile of a tiled slide, one ``read``
    (:class:`~pipeline.errors.SlideTooLargeError` naming the dimensions, the need and the budget).
    Raises :class:`~pipeline.errors.SlideOpenError` for a missing, empty, truncated, unsupported
    or non-image file, and for a TIFF with more than ``MAX_TIFF_DIRECTORIES`` directories.
    """
    mpp = check_open_args(mpp, max_pixels, max_decode_mb)
    budget = decode_budget_bytes(max_decode_mb)
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise SlideOpenError(path, "no such file") from None
    except OSError as exc:
        raise SlideOpenError(path, f"cannot stat: {exc.strerror or exc}") from None
    if p.is_dir():
        raise SlideOpenError(path, "is a directory, not a slide file")
    if st.st_size == 0:
        raise SlideOpenError(path, "empty file (0 bytes)")
    if not os.access(p, os.R_OK):
        raise SlideOpenError(path, "permission denied")

    from pipeline.slides._openslide import OpenSlideSlide, detect_vendor

    vendor = detect_vendor(p)
    if vendor is not None:
        # Before OpenSlide walks every directory (the remote reader applies the same rule; a
        # plain multi-page TIFF goes to Pillow, which reads its first page only).
        check_tiff_directories(p)
        return OpenSlideSlide(p, vendor, mpp, max_pixels, budget)
    if _is_tiled_tiff(p):
        # A tiled TIFF is a slide format; when OpenSlide cannot walk it the file is damaged
        # (typically truncated), and decoding a surviving first page whole would hide that.
        raise SlideOpenError(p, "tiled TIFF that OpenSlide cannot read (truncated or corrupt)")
    from pipeline.slides._image import ImageSlide

    return ImageSlide(p, mpp, max_pixels, budget)
