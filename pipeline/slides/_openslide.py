"""OpenSlide backend: every format OpenSlide reads (Aperio SVS, Hamamatsu NDPI/VMS, MIRAX MRXS,
Leica SCN, Philips TIFF, Ventana BIF, Sakura SVSLIDE, Zeiss CZI, DICOM WSI, generic tiled TIFF)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide

from pipeline.errors import SlideOpenError, SlideReadError
from pipeline.slides.base import Slide, _why

__all__ = ["OpenSlideSlide", "detect_vendor"]


def detect_vendor(path: str | Path) -> str | None:
    """OpenSlide's vendor name for ``path`` (``"aperio"``, ``"generic-tiff"``...), or None."""
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


class OpenSlideSlide(Slide):
    """A slide read through OpenSlide; RGBA is composited on white."""

    def __init__(self, path: str | Path, vendor: str, user_mpp: float | None, max_pixels: int):
        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as exc:  # includes OpenSlideUnsupportedFormatError
            raise SlideOpenError(path, f"OpenSlide cannot open this {vendor} file: {_why(exc)}") from exc
        self.format = f"openslide:{vendor}"
        props = self._osr.properties
        mpp = None
        try:
            mx = props.get(openslide.PROPERTY_NAME_MPP_X)
            my = props.get(openslide.PROPERTY_NAME_MPP_Y)
            vals = [float(v) for v in (mx, my) if v not in (None, "")]
            mpp = sum(vals) / len(vals) if vals else None
        except ValueError:
            mpp = None
        try:
            super().__init__(
                path,
                self._osr.level_dimensions,
                self._osr.level_downsamples,
                mpp,
                user_mpp,
                max_pixels,
            )
        except Exception:
            self._osr.close()
            raise

    @property
    def properties(self) -> dict[str, str]:
        """OpenSlide's metadata properties (``openslide.vendor``, ``aperio.AppMag``...)."""
        return dict(self._osr.properties)

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        # read_region takes the top-left in level-0 px and the size in the level's px.
        loc = (int(round(x0 * ds)), int(round(y0 * ds)))
        try:
            img = self._osr.read_region(loc, level, (x1 - x0, y1 - y0))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(self.path, f"tile read failed at level {level}: {_why(exc)}") from exc
        rgba = np.asarray(img)
        alpha = rgba[..., 3]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgba[..., :3])
        # Transparent = no scanned data (outside the scan area or between MRXS/VMS tiles): white.
        a = alpha[..., None].astype(np.uint16)
        rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
        return rgb.astype(np.uint8)

    def close(self) -> None:
        if not self._closed:
            self._osr.close()
        super().close()
