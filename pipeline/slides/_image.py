"""Pillow backend: plain field-of-view images from smear cameras (JPEG, PNG, BMP, GIF, WebP,
non-tiled TIFF). One level; the image is decoded whole on first read, so the memory that decode
needs is computed from the header and checked against the decode budget before any pixel is
decoded (:class:`~pipeline.errors.SlideTooLargeError`)."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import SlideOpenError, SlideReadError, SlideTooLargeError
from pipeline.slides.base import Slide, _why, over_budget

__all__ = ["ImageSlide", "decode_cost"]

# Pillow's own bomb check is a process-wide setting; we replace it with our per-call limit
# only while the header is parsed.
_PIL_LOCK = threading.Lock()

_RES_UNIT_UM = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: inch, centimetre -> µm

# Only decoders whose memory use is modelled in ``decode_cost`` run on untrusted files; other
# Pillow plugins (PSD, ICNS, FITS, EPS via Ghostscript...) are not smear-camera formats.
_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "GIF", "TIFF", "WEBP")  # JPEG also opens MPO
# Bytes per px of Pillow's in-memory image by mode (8-bit multi-band modes take 4 bytes).
_PIL_BYTES_PER_PX = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# Rows converted to RGB at a time: bounds the conversion's temporaries (at most ~32 bytes per
# band px, for 16-bit greys scaled in float64) to a few tens of MB whatever the image size.
_BAND_PX = 1 << 20
_BAND_BYTES = 32 * _BAND_PX
# The decoded RGB array, and one working copy of the same size (the EXIF rotation, or the
# detector's read of a tile that spans the whole image).
_OUT_BYTES_PER_PX = 3 + 3
# EXIF orientation -> the array operation ``ImageOps.exif_transpose`` performs.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def decode_cost(im: Image.Image) -> int:
    """Peak bytes decoding ``im`` (an opened, not yet loaded Pillow image) whole costs here,
    from its header: Pillow's image, the decoder's own buffers, the RGB array and one working
    copy. Measured on Pillow 13 (see tests/test_decode_budget.py): the estimate is an upper
    bound of the RSS growth of ``ImageSlide`` decode plus detection."""
    w, h = im.size
    px = w * h
    bands = len(im.getbands())
    held = _PIL_BYTES_PER_PX.get(im.mode, 4)
    extra = 0
    fmt = im.format or ""
    if fmt in ("JPEG", "MPO") and (im.info.get("progressive") or im.info.get("progression")):
        # libjpeg keeps every DCT coefficient (2 bytes per sample) of a progressive JPEG.
        extra = 2 * bands * px
    elif fmt == "WEBP":
        # libwebp's animation decoder (used for every WebP) holds two RGBA canvases.
        extra = 8 * px
    elif fmt == "TIFF":
        # libtiff decodes one strip (or tile) at a time into a buffer of its declared size.
        tags = getattr(im, "tag_v2", {})
        bits = _tiff_bits_per_px(tags, bands)
        if 322 in tags and 323 in tags:  # TileWidth, TileLength
            unit = int(tags[322]) * int(tags[323])
        else:
            unit = w * min(int(tags.get(278, h) or h), h)  # RowsPerStrip
        extra = unit * bits // 8 + 1
    elif fmt in ("BMP", "DIB"):
        # The RLE decoders build the whole raw image in a bytearray first.
        extra = px * max(1, int(im.info.get("bits", 8) or 8)) // 8 + 1
    return px * (held + _OUT_BYTES_PER_PX) + extra + _BAND_BYTES


def _tiff_bits_per_px(tags, bands: int) -> int:
    bps = tags.get(258, 8)
    try:
        vals = [int(v) for v in bps] if isinstance(bps, tuple | list) else [int(bps)]
    except (TypeError, ValueError):
        vals = [8]
    spp = int(tags.get(277, len(vals)) or len(vals))
    return max(vals + [8]) * max(spp, bands, 1)


class ImageSlide(Slide):
    """A single-level image read with Pillow (EXIF orientation applied)."""

    def __init__(
        self, path: str | Path, user_mpp: float | None, max_pixels: int, max_decode_bytes: int
    ):
        with _PIL_LOCK:
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    im = Image.open(str(path), formats=_FORMATS)
            except UnidentifiedImageError as exc:
                raise SlideOpenError(path, "not a recognised slide or image format") from exc
            except (OSError, ValueError, SyntaxError) as exc:
                raise SlideOpenError(path, f"cannot parse the image header: {_why(exc)}") from exc
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        self._im = im
        self.format = f"image:{(im.format or 'unknown').lower()}"
        w, h = im.size
        # Budget first: anything below may decode (PNG's getexif loads the whole image).
        try:
            if w * h > max_pixels:
                raise SlideTooLargeError(
                    path,
                    f"declared dimensions {w}x{h} ({w * h} px) exceed the {max_pixels} px limit "
                    "for images decoded whole (decompression bomb?)",
                )
            need = decode_cost(im)
            if need > max_decode_bytes:
                raise over_budget(
                    path,
                    f"declared dimensions {w}x{h} ({im.format} {im.mode})",
                    need,
                    max_decode_bytes,
                )
        except BaseException:
            im.close()
            raise
        # EXIF orientation 5-8 swaps the axes of the decoded image.
        try:
            orient = im.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block must not make the image unreadable
            orient = 1
        self._orientation = orient if orient in range(1, 9) else 1
        if self._orientation >= 5:
            w, h = h, w
        try:
            super().__init__(
                path, ((w, h),), (1.0,), _tiff_mpp(im), user_mpp, max_pixels, max_decode_bytes
            )
        except Exception:
            im.close()
            raise
        self._rgb: np.ndarray | None = None

    def _decode(self) -> np.ndarray:
        if self._rgb is None:
            try:
                im = self._im
                im.load()
                rgb = _to_rgb(im)
            except (OSError, ValueError, SyntaxError) as exc:
                raise SlideReadError(
                    self.path, f"truncated or corrupt image data: {_why(exc)}"
                ) from exc
            self._im.close()
            del im
            if self._orientation != 1:
                rgb = np.ascontiguousarray(_ORIENT[self._orientation](rgb))
            if rgb.shape[:2] != (self.dimensions[1], self.dimensions[0]):
                raise SlideReadError(
                    self.path, f"decoded size {rgb.shape[1]}x{rgb.shape[0]} differs from header"
                )
            self._rgb = rgb
        return self._rgb

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self._decode()[y0:y1, x0:x1].copy()

    def close(self) -> None:
        if not self._closed:
            self._im.close()
            self._rgb = None
        super().close()


def _to_rgb(im: Image.Image) -> np.ndarray:
    """``im`` (loaded) as ``(h, w, 3)`` uint8 RGB: alpha composited on white, 16-bit and float
    greys scaled by their maximum. Converted in bands of rows, so the only full-size buffers are
    Pillow's image and the result."""
    w, h = im.size
    out = np.empty((h, w, 3), np.uint8)
    alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    deep = im.mode.startswith("I;16") or im.mode in ("I", "F")
    top = (float(im.getextrema()[1]) or 1.0) if deep else 1.0
    rows = max(1, _BAND_PX // max(w, 1))
    for y in range(0, h, rows):
        band = im.crop((0, y, w, min(y + rows, h)))
        if alpha:
            rgba = band.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            band = Image.alpha_composite(white, rgba)
        elif deep:
            arr = np.asarray(band, dtype=np.float64)
            band = Image.fromarray((arr * (255.0 / top)).astype(np.uint8))
        out[y : y + band.height] = np.asarray(band.convert("RGB"))
    return out


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
