"""Nucleus / cytoplasm segmentation of one cell crop and its morphometry (pure numpy)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import measure, segmentation

from pipeline.detection._color import (
    background_rgb,
    check_rgb,
    disk,
    nucleus_feature,
    optical_density,
    otsu,
    smooth,
)
from pipeline.detection._detector import _check_mpp

__all__ = ["Morphometry", "segment_cell", "focus_score"]

_CELL_SPLIT = 0.4


@dataclass(frozen=True)
class Morphometry:
    """Measurements of the cell at the centre of a crop (µm, µm², colours 0-255).

    ``nc_ratio`` is nucleus area / cytoplasm area (``inf`` with no cytoplasm, NaN with no
    nucleus); ``nucleus_circularity`` is 4πA/P² (1 = circle); ``focus_score`` the variance of
    the Laplacian of the crop's grey image; masks are (H, W) bool in crop pixels.
    """

    cell_area_um2: float
    nucleus_area_um2: float
    cell_diameter_um: float
    nc_ratio: float
    nucleus_circularity: float
    nucleus_lobes: int
    cytoplasm_rgb: tuple[float, float, float]
    nucleus_rgb: tuple[float, float, float]
    focus_score: float
    nucleus_mask: np.ndarray
    cell_mask: np.ndarray


def focus_score(rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image (higher = sharper)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def _central_component(mask: np.ndarray, merge_px: float) -> np.ndarray:
    """Pieces of ``mask`` grouped (within ``merge_px``) with the group nearest the centre."""
    if not mask.any():
        return mask
    grown = cv2.dilate(mask.astype(np.uint8), disk(merge_px)) if merge_px >= 1 else mask
    lab, n = ndi.label(grown)
    h, w = mask.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    best, best_d = 0, np.inf
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        ys, xs = np.nonzero(lab[sl] == i)
        d = np.min((ys + sl[0].start - cy) ** 2 + (xs + sl[1].start - cx) ** 2)
        # prefer big groups near the centre: distance penalised by size
        d = d / max(len(ys), 1) ** 0.5
        if d < best_d:
            best, best_d = i, d
    return mask & (lab == best)


def segment_masks(crop: np.ndarray, px_um: float) -> tuple[np.ndarray, np.ndarray]:
    """(nucleus mask, cell mask) of the central cell of ``crop``, bool (H, W)."""
    bg = background_rgb(crop)
    od = optical_density(crop, bg)
    feat = smooth(nucleus_feature(od), 0.3 / px_um)
    total = smooth(od.sum(-1), 0.3 / px_um)
    # nucleus: the darkest purple class of the crop (Otsu on the stained pixels), never below
    # a faint floor
    stained = feat[feat > 0.15]
    t_n = max(otsu(stained) if stained.size > 20 else 0.3, 0.25)
    nuc = (feat > t_n).astype(np.uint8)
    nuc = cv2.morphologyEx(nuc, cv2.MORPH_OPEN, disk(0.4 / px_um))
    nuc = ndi.binary_fill_holes(nuc)
    nuc = _central_component(nuc, 1.5 / px_um)
    # cell: stained vs glass, split from neighbouring red cells by a watershed seeded by the
    # nucleus
    sample = np.minimum(total, np.percentile(total, 90)).ravel()
    t_o = otsu(sample)
    glass = float(np.median(sample[sample < t_o])) if (sample < t_o).any() else 0.0
    # pale cytoplasm is much closer to the glass than red cells are: split low (a crop is
    # centred on a cell, so unlike a whole field it is never mostly glass)
    t_c = max(glass + _CELL_SPLIT * (t_o - glass), 0.05)
    fg = (total > t_c).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, disk(0.5 / px_um))
    fg = ndi.binary_fill_holes(fg) | nuc
    if not nuc.any():
        cell = _central_component(fg, 0)
        return nuc, cell
    dist = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 5)
    far = cv2.dilate(nuc.astype(np.uint8), disk(3.0 / px_um)) == 0
    mx = ndi.maximum_filter(dist, size=max(int(5.0 / px_um), 3))
    peaks = (dist == mx) & (dist > 2.0 / px_um) & far
    plab, _ = ndi.label(peaks)
    markers = np.where(plab > 0, plab + 1, 0).astype(np.int32)
    markers[nuc] = 1
    ws = segmentation.watershed(-dist, markers, mask=fg)
    cell = ws == 1
    cell = cv2.morphologyEx(cell.astype(np.uint8), cv2.MORPH_OPEN, disk(0.5 / px_um)).astype(bool)
    cell = ndi.binary_fill_holes(cell | nuc)
    return nuc.astype(bool), cell.astype(bool)


def _lobes(nuc: np.ndarray, px_um: float) -> int:
    if not nuc.any():
        return 0
    # thin chromatin bridges between lobes vanish under a ~1 µm opening
    opened = cv2.morphologyEx(nuc.astype(np.uint8), cv2.MORPH_OPEN, disk(0.6 / px_um))
    lab, n = ndi.label(opened)
    if n == 0:
        return 1
    sizes = ndi.sum(np.ones_like(lab), lab, index=np.arange(1, n + 1)) * px_um * px_um
    return max(int((sizes >= 2.0).sum()), 1)


def segment_cell(crop: np.ndarray, mpp: float) -> Morphometry:
    """Segment the cell at the centre of ``crop`` ((H, W, 3) uint8 at ``mpp`` µm/px)."""
    check_rgb(crop, "crop")
    mpp = _check_mpp(mpp)
    nuc, cell = segment_masks(crop, mpp)
    a_px = mpp * mpp
    cell_area = float(cell.sum()) * a_px
    nuc_area = float(nuc.sum()) * a_px
    cyto = cell & ~nuc
    cyto_area = float(cyto.sum()) * a_px
    if nuc_area == 0:
        nc = math.nan
    elif cyto_area == 0:
        nc = math.inf
    else:
        nc = nuc_area / cyto_area
    circ = math.nan
    if nuc.any():
        perim = sum(r.perimeter for r in measure.regionprops(nuc.astype(np.uint8))) * mpp
        if perim > 0:
            circ = float(min(4 * math.pi * nuc_area / (perim * perim), 1.0))

    def mean_rgb(m: np.ndarray) -> tuple[float, float, float]:
        if not m.any():
            return (math.nan, math.nan, math.nan)
        v = crop[m].astype(np.float64).mean(0)
        return (float(v[0]), float(v[1]), float(v[2]))

    return Morphometry(
        cell_area_um2=cell_area,
        nucleus_area_um2=nuc_area,
        cell_diameter_um=float(2.0 * math.sqrt(cell_area / math.pi)),
        nc_ratio=float(nc),
        nucleus_circularity=float(circ),
        nucleus_lobes=_lobes(nuc, mpp),
        cytoplasm_rgb=mean_rgb(cyto),
        nucleus_rgb=mean_rgb(nuc),
        focus_score=focus_score(crop),
        nucleus_mask=nuc,
        cell_mask=cell,
    )
