"""Physical scale of a blood-smear image from its red cells (typical diameter taken as 7.5 µm).

The one red-cell scale estimator of the project: the job (``pipeline.detect``, through
``pipeline.detection``) and the dataset readers (``hemblip.data``) both call it, so a field gets
the same µm/px whether it is cut into training crops or sent through the job.

The red-cell size is read from a granulometry (pattern spectrum) of the cell/glass mask rather
than from isolated cells: opening the mask with discs of growing radius r removes every object
whose largest inscribed disc is smaller than r, so the area lost per step peaks at the radius of
the most common (area-weighted) object - the red cells. Touching and overlapping red cells do not
disturb it (two touching discs contain no larger disc than each one), and nuclei are masked out
so white cells do not compete. Each opening is two distance transforms, so the whole spectrum
costs a few tens of milliseconds on a 512-px image.

The stain-agnostic colour features it needs (optical density relative to the image's own glass,
the "nucleus feature" ``OD_G - 0.5 OD_B``) live here too; ``pipeline.detection`` imports them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np
from scipy import ndimage as ndi

from hemblip.errors import HemblipConfigError

__all__ = [
    "estimate_mpp",
    "estimate_image_mpp",
    "RBC_DIAMETER_UM",
    "red_cell_diameter_px",
    "ESTIMATE_WINDOW",
    "tiff_resolution_mpp",
]

RBC_DIAMETER_UM = 7.5
#: :func:`estimate_image_mpp` reads windows of this side (px): enough red cells, bounded cost.
ESTIMATE_WINDOW = 2048
_MAX_SIDE = 512  # the spectrum is computed on a copy reduced (by powers of 2) to at most this
_MIN_RADIUS_PX = 2.0  # at the reduced size; smaller objects are noise, stain specks, rims
_STEP = 1.1  # geometric step of the disc radii
_FINE_DIAMETER_PX = 16.0  # below this (after reduction) the estimate is redone finer


def check_rgb(rgb: object, name: str = "rgb") -> np.ndarray:
    """``rgb`` if it is an (H, W, 3) uint8 array of at least 2x2 px, else HemblipConfigError."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
        shape = getattr(rgb, "shape", None)
        raise HemblipConfigError(f"{name}: expected an (H, W, 3) uint8 array, got shape {shape}")
    if rgb.dtype != np.uint8:
        raise HemblipConfigError(f"{name}: expected dtype uint8, got {rgb.dtype}")
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise HemblipConfigError(f"{name}: image too small {rgb.shape[:2]}")
    return rgb


def background_rgb(rgb: np.ndarray) -> np.ndarray:
    """Per-channel brightness of the glass (float32 (3,)): median colour of the brightest 5 %.

    Floored at 150 so that a tile filled with cells does not call a cell the background.
    """
    flat = rgb.reshape(-1, 3)
    if flat.shape[0] > 200_000:  # a strided sample is plenty for a percentile
        flat = flat[:: flat.shape[0] // 200_000 + 1]
    lum = flat.astype(np.int32).sum(1)
    cut = np.percentile(lum, 95)
    bright = flat[lum >= cut]
    bg = np.median(bright, axis=0).astype(np.float32)
    return np.maximum(bg, 150.0)


def optical_density(rgb: np.ndarray, bg: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) float32 OD relative to ``bg``, clipped at 0."""
    if bg is None:
        bg = background_rgb(rgb)
    lut = np.empty((3, 256), np.float32)
    for c in range(3):
        lut[c] = np.log((bg[c] + 1.0) / (np.arange(256, dtype=np.float32) + 1.0))
    od = np.stack([lut[c][rgb[..., c]] for c in range(3)], axis=-1)
    return np.maximum(od, 0.0)


def nucleus_feature(od: np.ndarray) -> np.ndarray:
    """(H, W) float32: high on nuclei (purple/blue), low on red cells, glass and cytoplasm."""
    return od[..., 1] - 0.5 * od[..., 2]


def smooth(img: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px < 0.3:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigma_px)


def otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu threshold of a 1-D float sample (float; the midpoint for a constant sample)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return 0.0
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-6:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def _cell_mask(img: np.ndarray) -> np.ndarray:
    od = optical_density(img, background_rgb(img))
    total = smooth(od.sum(-1), 1.0)
    feat = smooth(nucleus_feature(od), 1.0)
    step = max(1, total.size // 100_000)
    # glass vs cells (clipped at the 90th percentile so dark nuclei weigh less); when that split
    # separated nuclei from everything else (a large white cell in the field), split again on
    # the non-nuclear pixels only
    every = total.ravel()[::step]
    sample = every[feat.ravel()[::step] <= 1.0]
    if sample.size < 50:
        return np.zeros(total.shape, np.uint8)
    t = otsu(np.minimum(every, np.percentile(every, 90)))
    above = every > t
    if above.any() and (feat.ravel()[::step][above] > 0.6).mean() > 0.4:
        t = otsu(np.minimum(sample, np.percentile(sample, 90)))  # the split found the nuclei
    t = max(t, 0.12)
    fg = (total > t).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    fg = ndi.binary_fill_holes(fg).astype(np.uint8)  # the pale centre belongs to the cell
    nuc = (feat > 0.6).astype(np.uint8)
    # strongly stained (nuclear) pixels are not red cells; a white cell's pale cytoplasm left
    # around them is thin and does not make a peak of its own
    fg[cv2.dilate(nuc, np.ones((5, 5), np.uint8)) > 0] = 0
    return fg


def _opened_area(dist: np.ndarray, r: float) -> float:
    """Area of the mask opened by a disc of radius r, from the mask's distance map."""
    core = (dist >= r).astype(np.uint8)
    if not core.any():
        return 0.0
    back = cv2.distanceTransform(1 - core, cv2.DIST_L2, 5)
    return float((back <= r).sum())


def _diameter_at(rgb: np.ndarray, factor: int, min_cells: float) -> float | None:
    """Granulometric red-cell diameter (px of ``rgb``) computed on ``rgb`` reduced ``factor``×."""
    h, w = rgb.shape[:2]
    img = rgb
    if factor > 1:
        img = cv2.resize(
            rgb, (max(w // factor, 2), max(h // factor, 2)), interpolation=cv2.INTER_AREA
        )
    fg = _cell_mask(img)
    if fg.sum() < 50:
        return None
    dist = cv2.distanceTransform(fg, cv2.DIST_L2, 5)
    n_steps = (
        int(math.log(max(min(fg.shape) / 3, _MIN_RADIUS_PX * _STEP) / _MIN_RADIUS_PX, _STEP)) + 1
    )
    radii = _MIN_RADIUS_PX * _STEP ** np.arange(max(n_steps, 3))
    areas = np.array([_opened_area(dist, r) for r in radii])
    lost = areas[:-1] - areas[1:]
    spec = np.convolve(lost, [0.25, 0.5, 0.25], mode="same")
    # the first radius is a boundary (noise, stain specks), never the peak
    inner = spec[1:-1] if len(spec) > 2 else spec
    if inner.size == 0 or inner.max() <= 0:
        return None
    i = 1 + int(np.argmax(inner)) if len(spec) > 2 else int(np.argmax(spec))
    # parabolic refinement of the peak on the log-radius axis
    off = 0.0
    if 0 < i < len(spec) - 1:
        a, b, c = spec[i - 1], spec[i], spec[i + 1]
        den = a - 2 * b + c
        if den < 0:
            off = float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))
    r_peak = _MIN_RADIUS_PX * _STEP ** (i + 0.5 + off)
    # how many cells of that size were removed around the peak (±1 step)
    band = lost[max(i - 1, 0) : i + 2].sum()
    if band / (math.pi * r_peak * r_peak) < min_cells:
        return None
    return 2.0 * r_peak * factor


def red_cell_diameter_px(rgb: np.ndarray, min_cells: float = 0.5) -> float | None:
    """Typical red-cell diameter in px of ``rgb`` ((H, W, 3) uint8), or None.

    Computed on a copy reduced (by powers of 2) to ≤ 512 px; when red cells come out under
    ~16 px there, it is recomputed at a finer reduction on a central window, so a 2048-px
    level-0 window at 0.25 µm/px is measured as precisely as a small field. None when the mask
    holds fewer than about ``min_cells`` cells' worth of area at the peak radius.
    """
    check_rgb(rgb)
    h, w = rgb.shape[:2]
    factor = 1
    while max(h, w) / factor > _MAX_SIDE:
        factor *= 2
    d = _diameter_at(rgb, factor, min_cells)
    if d is None or factor == 1 or d / factor >= _FINE_DIAMETER_PX:
        return d
    fine = factor
    while fine > 1 and d / fine < _FINE_DIAMETER_PX:
        fine //= 2
    side = _MAX_SIDE * fine  # keep the work the same: a ≤ 512-px image after reduction
    y0, x0 = max((h - side) // 2, 0), max((w - side) // 2, 0)
    d2 = _diameter_at(rgb[y0 : y0 + side, x0 : x0 + side], fine, min_cells)
    return d2 if d2 is not None else d


def estimate_mpp(rgb: np.ndarray, min_cells: float = 0.5) -> float | None:
    """µm per pixel of ``rgb`` ((H, W, 3) uint8) from its red cells, or None.

    The typical red-cell diameter (granulometry of the cell mask, nuclei excluded) is taken as
    7.5 µm. None when fewer than about ``min_cells`` red cells are visible or they are under
    ~4 px across. Red cells should be ≥ ~10 px across in ``rgb`` for a usable estimate (call it
    on a fine pyramid level).
    """
    d = red_cell_diameter_px(rgb, min_cells=min_cells)
    if d is None or d < 4.0:
        return None
    return RBC_DIAMETER_UM / d


def estimate_image_mpp(
    read: Callable[[tuple[int, int, int, int]], np.ndarray], width: int, height: int
) -> float | None:
    """µm/px of a ``width`` x ``height`` px image read through ``read((x0, y0, x1, y1))`` (px,
    x1/y1 exclusive, returns (y1-y0, x1-x0, 3) uint8), or None: the job's rule.

    An image of at most ``ESTIMATE_WINDOW`` px a side is estimated whole; a larger one is the
    median of the estimates on up to five ``ESTIMATE_WINDOW``-px windows (centre first, stopping
    after three that succeed), so a whole slide is never decoded for its scale.
    """
    w, h = int(width), int(height)
    side = ESTIMATE_WINDOW
    if w <= side and h <= side:
        return estimate_mpp(read((0, 0, w, h)))
    centres = [(0.5, 0.5), (0.25, 0.25), (0.75, 0.75), (0.25, 0.75), (0.75, 0.25)]
    found = []
    for fx, fy in centres:
        x0 = int(min(max(fx * w - side / 2, 0), max(w - side, 0)))
        y0 = int(min(max(fy * h - side / 2, 0), max(h - side, 0)))
        est = estimate_mpp(read((x0, y0, min(x0 + side, w), min(y0 + side, h))))
        if est is not None:
            found.append(est)
        if len(found) >= 3:
            break
    return float(np.median(found)) if found else None


_RES_UNIT_UM = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: inch, centimetre -> µm
_PLAUSIBLE_MPP = (0.01, 50.0)  # µm/px a microscope image can have (the job's slide readers' range)


def tiff_resolution_mpp(im: object) -> float | None:
    """µm/px from an open Pillow image's TIFF resolution tags (inch or cm units) when present
    and plausible (0.01-50 µm/px, the job's range), else None."""
    tags = getattr(im, "tag_v2", None)
    if not tags:
        return None
    try:
        unit = int(tags.get(296, 2))  # ResolutionUnit; the TIFF default is inch
        xres = float(tags.get(282, 0) or 0)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if unit not in _RES_UNIT_UM or not math.isfinite(xres) or xres <= 0:
        return None
    mpp = _RES_UNIT_UM[unit] / xres
    if not _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1]:
        return None
    return float(f"{mpp:.10g}")  # the job's rounding: drops rational noise (0.07200000000000001)
