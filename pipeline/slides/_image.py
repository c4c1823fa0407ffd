"""Pillow backend: plain field-of-view images from smear cameras (JPEG, PNG, BMP, non-tiled
TIFF...). One level; the image is decoded whole on first read (the size guard caps it)."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import SlideOpenError, SlideReadError, SlideTooLargeError
from pipeline.slides.base import Slide, _why

__all__ = ["ImageSlide"]

# Pillow's own bomb check is a process-wide setting; we replace it with our per-call limit
# only while the header is parsed.
_PIL_LOCK = threading.Lock()

_RES_UNIT_UM = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: inch, centimetre -> µm


class ImageSlide(Slide):
    """A single-level image read with Pillow (EXIF orientation applied)."""

    def __init__(self, path: str | Path, user_mpp: float | None, max_pixels: int):
        with _PIL_LOCK:
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    im = Image.open(str(path))
            except UnidentifiedImageError as exc:
                raise SlideOpenError(path, "not a recognised slide or image format") from exc
            except (OSError, ValueError, SyntaxError) as exc:
                raise SlideOpenError(path, f"cannot parse the image header: {_why(exc)}") from exc
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        self._im = im
        self.format = f"image:{(im.format or 'unknown').lower()}"
        w, h = im.size
        # EXIF orientation 5-8 swaps the axes of the decoded image.
        try:
            orient = im.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block must not make the image unreadable
            orient = 1
        self._orientation = orient if orient in range(1, 9) else 1
        if self._orientation >= 5:
            w, h = h, w
        if w * h > max_pixels:
            im.close()
            raise SlideTooLargeError(
                path,
                f"declared dimensions {w}x{h} ({w * h} px) exceed the {max_pixels} px limit "
                "for images decoded whole (decompression bomb?)",
            )
        try:
            super().__init__(path, ((w, h),), (1.0,), _tiff_mpp(im), user_mpp, max_pixels)
        except Exception:
            im.close()
            raise
        self._rgb: np.ndarray | None = None

    def _decode(self) -> np.ndarray:
        if self._rgb is None:
            try:
                im = self._im
                im.load()
                if self._orientation != 1:
                    im = ImageOps.exif_transpose(im)
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")
                    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(white, rgba)
                elif im.mode.startswith("I;16") or im.mode in ("I", "F"):
                    arr = np.asarray(im, dtype=np.float64)
                    top = arr.max() or 1.0
                    im = Image.fromarray((arr * (255.0 / top)).astype(np.uint8))
                rgb = np.asarray(im.convert("RGB"))
            except (OSError, ValueError, SyntaxError) as exc:
                raise SlideReadError(self.path, f"truncated or corrupt image data: {_why(exc)}") from exc
            if rgb.shape[:2] != (self.dimensions[1], self.dimensions[0]):
                raise SlideReadError(self.path, f"decoded size {rgb.shape[1]}x{rgb.shape[0]} differs from header")
            self._rgb = np.ascontiguousarray(rgb)
            self._im.close()
        return self._rgb

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self._decode()[y0:y1, x0:x1].copy()

    def close(self) -> None:
        if not self._closed:
            self._im.close()
            self._rgb = None
        super().close()


def _tiff_mpp(im: Image.Image) -> float | None:
    """µm/px from TIFF resolution tags (cm or inch units), else None."""
    tags = getattr(im, "tag_v2", None)
    if not tags:
        return None
    try:
        unit = int(tags.get(296, 2))  # ResolutionUnit, TIFF default inch
        xres = float(tags.get(282, 0) or 0)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if unit not in _RES_UNIT_UM or xres <= 0:
        return None
    return _RES_UNIT_UM[unit] / xres
