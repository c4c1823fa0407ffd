"""The backend-independent slide interface.

A :class:`Slide` is a pyramid of RGB levels addressed in each level's own pixel coordinates,
plus the level-0 physical scale (µm per pixel) when the file records one. Backends implement
``_read(level, x0, y0, x1, y1)`` for boxes already clipped to the level; the base class handles
validation, the white padding of parts outside the slide, and the context-manager protocol.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, SlideReadError, SlideTooLargeError

__all__ = [
    "Slide",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_DECODE_MB",
    "MAX_SIDE_PX",
    "MAX_TIFF_DIRECTORIES",
    "plausible_mpp",
]

#: Refuse plain images whose level 0 declares more pixels than this (they are decoded whole),
#: and any single ``read`` larger than this.
DEFAULT_MAX_PIXELS = 2**31
#: Memory budget (MiB) of any one decode, computed from the header before decoding: a plain
#: image decoded whole (decoder buffers, the RGB array and one working copy), one tile of a tiled
#: slide, or one ``read``'s buffers. A compressed file can declare any size (a 1.5 MB PNG declares
#: 20000 x 20000 px = 4.5 GiB decoded); 1 GiB holds a ~100 Mpx camera image, far above smear
#: cameras (5-20 Mpx), and keeps several workers per host safe from the OOM killer.
DEFAULT_MAX_DECODE_MB = 1024
#: More TIFF directories (IFDs) than this is a corrupt or hostile file: slides have 2-20 (levels,
#: thumbnail, label, macro). Walking tens of thousands costs seconds and memory before any pixel;
#: both the local and the remote reader refuse such a file (:class:`SlideOpenError`).
MAX_TIFF_DIRECTORIES = 64
_MIB = 1024 * 1024
#: No scanner produces a level-0 side this long (a 25 mm x 75 mm glass slide at 0.1 µm/px is
#: 750,000 px); a longer declared side is a corrupt or hostile header.
MAX_SIDE_PX = 2**20

# A recorded scale outside this range is not a microscope scale: most often it is a 72/96/300 dpi
# default written by a generic image tool (72 dpi -> 352.8 µm/px).
_MPP_RANGE = (0.01, 50.0)


def plausible_mpp(value: float | None) -> float | None:
    """``value`` if it is a finite microscope scale in µm/px, else None."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v) or not _MPP_RANGE[0] <= v <= _MPP_RANGE[1]:
        return None
    return float(f"{v:.10g}")  # drop binary noise of resolution rationals (0.07200000000000001)


def check_open_args(
    mpp: object, max_pixels: object, max_decode_mb: object = DEFAULT_MAX_DECODE_MB
) -> float | None:
    """Validate ``open_slide``'s ``mpp``, ``max_pixels`` and ``max_decode_mb`` (MiB); returns
    mpp as float (or None).

    Raises :class:`~pipeline.errors.ConfigError` naming the flag at fault.
    """
    if mpp is not None:
        try:
            ok = 0 < float(mpp) < float("inf")
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"--mpp must be a positive number of µm per pixel, got {mpp!r}")
        mpp = float(mpp)
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ConfigError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if (
        not isinstance(max_decode_mb, int | float)
        or isinstance(max_decode_mb, bool)
        or not 0 < max_decode_mb < float("inf")
    ):
        raise ConfigError(
            f"--max-decode-mb must be a positive number of MiB, got {max_decode_mb!r}"
        )
    return mpp


def decode_budget_bytes(max_decode_mb: float) -> int:
    """``max_decode_mb`` (MiB, already validated) in bytes."""
    return int(max_decode_mb * _MIB)


def over_budget(path: object, what: str, need: int, budget: int) -> SlideTooLargeError:
    """The one-line error for a decode needing ``need`` bytes over the ``budget`` (bytes)."""
    return SlideTooLargeError(
        path,
        f"{what} would need {_mib(need)} MiB to decode, over the {_mib(budget)} MiB decode budget "
        "(--max-decode-mb; corrupt header or decompression bomb)",
    )


def _mib(n: int) -> str:
    return f"{n / _MIB:.0f}" if n >= 10 * _MIB else f"{n / _MIB:.1f}"


class Slide:
    """A whole slide or a field-of-view image; open it with :func:`pipeline.slides.open_slide`.

    Attributes: ``path`` (str), ``format`` (e.g. ``"openslide:aperio"``, ``"image:jpeg"``),
    ``level_dimensions`` (``((w, h), ...)``, level 0 first), ``level_downsamples``
    (``(1.0, ...)``), ``mpp`` (level-0 µm/px or None) and ``mpp_source`` (``"metadata"``,
    ``"user"`` or None; estimation is the detection stage's job).
    """

    format: str = "unknown"
    #: Bytes one ``read`` allocates per px of its box (output plus the backend's buffers).
    _read_bytes_per_px: int = 3
    #: Bytes read from object storage to serve this slide (a staged copy's download, the ranged
    #: GETs of an in-place reader); None for a local file.
    bytes_fetched: int | None = None
    #: Whether the slide was copied to local scratch space to be opened (removed on ``close``).
    staged: bool = False

    def __init__(
        self,
        path: str | Path,
        level_dimensions: tuple[tuple[int, int], ...],
        level_downsamples: tuple[float, ...],
        metadata_mpp: float | None,
        user_mpp: float | None,
        max_pixels: int,
        max_decode_bytes: int | None = None,
    ):
        self.path = str(path)
        self.level_dimensions = tuple((int(w), int(h)) for w, h in level_dimensions)
        self.level_downsamples = tuple(float(d) for d in level_downsamples)
        self.max_pixels = int(max_pixels)
        self.max_decode_bytes = (
            decode_budget_bytes(DEFAULT_MAX_DECODE_MB)
            if max_decode_bytes is None
            else int(max_decode_bytes)
        )
        for w, h in self.level_dimensions:
            if w <= 0 or h <= 0:
                raise SlideReadError(self.path, f"level with empty dimensions {w}x{h}")
            if max(w, h) > MAX_SIDE_PX:
                raise SlideTooLargeError(
                    self.path,
                    f"declared dimensions {w}x{h} exceed the {MAX_SIDE_PX} px side limit "
                    "(corrupt header or decompression bomb)",
                )
        # Metadata wins over the user's value: --mpp is the fallback for files without a scale.
        mpp = plausible_mpp(metadata_mpp)
        if mpp is not None:
            self.mpp, self.mpp_source = mpp, "metadata"
        elif user_mpp is not None:
            self.mpp, self.mpp_source = float(user_mpp), "user"
        else:
            self.mpp, self.mpp_source = None, None
        self._closed = False

    # -- geometry ---------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in px."""
        return self.level_dimensions[0]

    def level_mpp(self, level: int) -> float | None:
        """µm per pixel of ``level`` (None when the slide has no scale)."""
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    # -- pixels -----------------------------------------------------------------------------
    def read(self, level: int, box: tuple[int, int, int, int]) -> np.ndarray:
        """Pixels of ``box = (x0, y0, x1, y1)`` (``level``'s px, x1/y1 exclusive).

        Returns ``(y1 - y0, x1 - x0, 3)`` uint8 RGB; parts outside the slide are white (255).
        Raises :class:`~pipeline.errors.SlideReadError` when the pixel data cannot be decoded.
        """
        if self._closed:
            raise ValueError(f"{self.path}: slide is closed")
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} not in 0..{self.level_count - 1}")
        x0, y0, x1, y1 = (int(v) for v in box)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{self.path}: empty box {box}")
        if (x1 - x0) * (y1 - y0) > self.max_pixels:
            raise SlideTooLargeError(
                self.path,
                f"a read of {x1 - x0}x{y1 - y0} px exceeds the {self.max_pixels} px limit",
            )
        need = (x1 - x0) * (y1 - y0) * self._read_bytes_per_px
        if need > self.max_decode_bytes:
            raise over_budget(
                self.path,
                f"a read of {x1 - x0}x{y1 - y0} px at level {level}",
                need,
                self.max_decode_bytes,
            )
        w, h = self.level_dimensions[level]
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
            return self._read_checked(level, x0, y0, x1, y1)
        out = np.full((y1 - y0, x1 - x0, 3), 255, np.uint8)
        if cx1 > cx0 and cy1 > cy0:
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = self._read_checked(
                level, cx0, cy0, cx1, cy1
            )
        return out

    def prefetch(self, level: int, boxes) -> None:
        """Hint that ``read(level, box)`` follows for each of ``boxes`` (``level`` px). Backends
        that read over the network fetch the data in one batch; local backends ignore it."""
        if self._closed:
            raise ValueError(f"{self.path}: slide is closed")

    def _read_checked(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        try:
            arr = self._read(level, x0, y0, x1, y1)
        except SlideReadError:
            raise
        except (OSError, ValueError, SyntaxError, MemoryError) as exc:
            raise SlideReadError(
                self.path, f"cannot decode pixels at level {level}: {_why(exc)}"
            ) from exc
        if arr.shape != (y1 - y0, x1 - x0, 3) or arr.dtype != np.uint8:  # backend contract
            raise SlideReadError(self.path, f"backend returned {arr.shape} {arr.dtype}")
        return arr

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        self._closed = True
        # Cleanups registered by the slide factory (a staged copy's removal): after the backend
        # has released its file handles.
        for cleanup in self.__dict__.pop("_cleanups", ()):
            cleanup()

    def add_cleanup(self, fn) -> None:
        """Call ``fn()`` once when the slide is closed (after the backend released its files)."""
        self.__dict__.setdefault("_cleanups", []).append(fn)

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.path!r} {self.format} {self.dimensions[0]}x"
            f"{self.dimensions[1]} levels={self.level_count} mpp={self.mpp} ({self.mpp_source})>"
        )


def _why(exc: BaseException) -> str:
    """One-line cause of a library exception (its message, else its type)."""
    msg = " ".join(str(exc).split())
    return msg or type(exc).__name__
