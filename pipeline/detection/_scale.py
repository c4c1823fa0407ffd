"""Physical scale from the red cells: their typical diameter is taken as 7.5 µm.

The red-cell size is read from a granulometry (pattern spectrum) of the cell/glass mask rather
than from isolated cells: opening the mask with discs of growing radius r removes every object
whose largest inscribed disc is smaller than r, so the area lost per step peaks at the radius of
the most common (area-weighted) object - the red cells. Touching and overlapping red cells do not
disturb it (two touching discs contain no larger disc than each one), and nuclei are masked out
so white cells do not compete. Each opening is two distance transforms, so the whole spectrum
costs a few tens of milliseconds on a 512-px image.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage as ndi

from pipeline.detection._color import (
    background_rgb,
    check_rgb,
    nucleus_feature,
    optical_density,
    otsu,
    smooth,
)

__all__ = ["estimate_mpp", "RBC_DIAMETER_UM", "red_cell_diameter_px"]

RBC_DIAMETER_UM = 7.5
_MAX_SIDE = 512  # the spectrum is computed on a copy reduced (by powers of 2) to at most this
_MIN_RADIUS_PX = 2.0  # at the reduced size; smaller objects are noise, stain specks, rims
_STEP = 1.1  # geometric step of the disc radii
_FINE_DIAMETER_PX = 16.0  # below this (after reduction) the estimate is redone finer


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
        img = cv2.resize(rgb, (max(w // factor, 2), max(h // factor, 2)), interpolation=cv2.INTER_AREA)
    fg = _cell_mask(img)
    if fg.sum() < 50:
        return None
    dist = cv2.distanceTransform(fg, cv2.DIST_L2, 5)
    n_steps = int(math.log(max(min(fg.shape) / 3, _MIN_RADIUS_PX * _STEP) / _MIN_RADIUS_PX, _STEP)) + 1
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
