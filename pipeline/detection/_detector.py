"""White-cell detection on one RGB field or tile (pure numpy/OpenCV, no I/O).

Method (all lengths in µm, converted with the image's mpp):
1. Reduce the image to ``working_mpp`` (finer images only) and compute the nucleus feature
   (optical density ``OD_G - 0.5 OD_B`` against the image's own glass colour).
2. Nucleus candidates: feature above ``max(nucleus_threshold, adaptive split)``; small specks
   removed; fragments closer than ``lobe_merge_um`` grouped into one nucleus (lobes of a
   segmented neutrophil, broken chromatin of a blurred cell). A large group with a poor fill of
   its box (red-cell rims chained to a nucleus in a purple stain) is re-thresholded within
   itself and regrouped (``chain_*`` settings, :func:`_split_chains`).
3. Candidates whose nucleus area lies outside the white-cell range are dropped (platelets,
   debris); the rest are scored (a small learned verifier on colour/shape/size features, or a
   colour-contrast score) and kept above ``min_score``.
4. Whole-cell extent: watershed of the cell/glass mask with the nucleus and the neighbouring
   red cells as markers, limited to ``max_cell_diameter_um``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage import segmentation

from pipeline.detection._color import (
    background_rgb,
    cell_threshold,
    check_rgb,
    disk,
    nucleus_feature,
    optical_density,
    otsu,
    smooth,
)
from pipeline.detection._config import DetectorConfig
from pipeline.errors import ConfigError

__all__ = ["Detection", "detect_wbc"]


@dataclass(frozen=True)
class Detection:
    """One white cell in the image given to :func:`detect_wbc` (pixel coordinates of that image).

    ``bbox`` is ``(x0, y0, x1, y1)`` with x1/y1 exclusive and covers nucleus + cytoplasm;
    ``centroid`` ``(x, y)`` is the nucleus centroid; ``area_px`` the whole-cell area in px²;
    ``score`` in [0, 1]; ``clumped`` when the cell touches another detected white cell.
    """

    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area_px: float
    score: float
    clumped: bool


@dataclass
class _Candidate:
    label: int
    mask_slice: tuple[slice, slice]
    nucleus: np.ndarray  # bool, within mask_slice
    features: dict


def _check_mpp(mpp: object) -> float:
    if (
        isinstance(mpp, bool)
        or not isinstance(mpp, int | float)
        or not np.isfinite(mpp)
        or mpp <= 0
    ):
        raise ConfigError(f"mpp: must be a positive number of µm per pixel, got {mpp!r}")
    return float(mpp)


def _work_image(rgb: np.ndarray, mpp: float, cfg: DetectorConfig) -> tuple[np.ndarray, float]:
    """(image at the working resolution, its scale relative to ``rgb``: work px per rgb px)."""
    f = mpp / cfg.working_mpp
    if f >= 0.9:
        return rgb, 1.0
    h, w = rgb.shape[:2]
    nw, nh = max(int(round(w * f)), 2), max(int(round(h * f)), 2)
    return cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA), nw / w


def _group_lobes(mask: np.ndarray, px_um: float, cfg: DetectorConfig) -> tuple[np.ndarray, int]:
    """(int32 labels of ``mask``'s pixels grouped into nuclei, number of groups).

    Fragments within ``lobe_merge_um`` share a label; fragments smaller than a whole nucleus
    (lobes of a segmented neutrophil, broken chromatin of a blurred cell, area below
    ``lobe_max_area_um2``) reach further, so two whole nuclei side by side stay two cells.
    """
    grow = cv2.dilate(mask, disk(cfg.lobe_merge_um / 2 / px_um)) if cfg.lobe_merge_um > 0 else mask
    flab, nf = ndi.label(mask)
    if nf:
        sizes = ndi.sum(mask, flab, index=np.arange(1, nf + 1)) * px_um * px_um
        small = np.isin(flab, 1 + np.flatnonzero(sizes < cfg.lobe_max_area_um2)).astype(np.uint8)
        if small.any() and cfg.lobe_merge_um > 0:
            grow = grow | cv2.dilate(small, disk(cfg.lobe_merge_um * 1.5 / px_um))
    glab, n = ndi.label(grow)
    return np.where(mask > 0, glab, 0).astype(np.int32), int(n)


def _chained(area_um2: float, fill: float, cfg: DetectorConfig) -> bool:
    """Whether a nucleus group looks like a chain of red-cell rims, not one nucleus: larger than
    ``chain_area_um2`` and filling less than ``chain_min_fill`` of its bounding box. Not size
    alone: a field whose scale is estimated 2-3x too coarse shows its nuclei at 300-1,200 µm²,
    still filling 0.4-0.8 of their box (TXL-PBC train, Raabin)."""
    return area_um2 > cfg.chain_area_um2 and fill < cfg.chain_min_fill


def _split_chains(
    labels: np.ndarray,
    n: int,
    feat: np.ndarray,
    thr: float,
    px_um: float,
    cfg: DetectorConfig,
) -> tuple[np.ndarray, int]:
    """Re-threshold chained groups (:func:`_chained`) within themselves; (labels, last label).

    In a purple stain (Raabin's) the rims and overlaps of red cells pass the field's nucleus
    threshold and the lobe rule chains them, and a touching white cell's nucleus, into one
    group of hundreds of µm² whose centroid lies off the cell. Inside such a group the nucleus
    is the darkest class: the group is cut at the Otsu split of its own feature values (when
    that is above ``thr``), the pieces above it are opened and regrouped with the lobe rule,
    and the rest (the rims) is dropped. A piece still chained is cut again, at most
    ``chain_passes`` times. On TXL-PBC train fields a white cell's nucleus group larger than
    120 µm² fills 0.45-0.50 of its box or more (1st percentile of Kaggle, PBC, Raabin; one of
    145 such Raabin groups below 0.3); the chained groups around the missed white cells of
    generated Raabin smears (train fields) are 145-2,650 µm² and fill 0.10-0.36.
    """
    if cfg.chain_passes == 0 or n == 0:
        return labels, n
    px_area = px_um * px_um
    open_k = disk(0.5 / px_um)
    reach = int(np.ceil(cfg.lobe_merge_um * 1.5 / px_um)) + 1
    todo = list(range(1, n + 1))
    for _ in range(cfg.chain_passes):
        objs = ndi.find_objects(labels, max_label=n)
        again: list[int] = []
        for i in todo:
            sl = objs[i - 1] if i - 1 < len(objs) else None
            if sl is None:
                continue
            m = labels[sl] == i
            area = float(m.sum()) * px_area
            fill = float(m.mean())
            if not _chained(area, fill, cfg):
                continue
            vals = feat[sl][m]
            t_in = otsu(vals) if vals.size > 50 else thr
            if not t_in > thr:
                continue
            # The group's window grown by the lobe rule's reach, so regrouping sees the same
            # neighbourhood (pieces are all inside the group's box).
            y0, y1 = max(sl[0].start - reach, 0), min(sl[0].stop + reach, labels.shape[0])
            x0, x1 = max(sl[1].start - reach, 0), min(sl[1].stop + reach, labels.shape[1])
            win = labels[y0:y1, x0:x1]
            grp = win == i
            core = (grp & (feat[y0:y1, x0:x1] > t_in)).astype(np.uint8)
            core = cv2.morphologyEx(core, cv2.MORPH_OPEN, open_k)
            sub, ns = _group_lobes(core, px_um, cfg)
            win[grp] = 0
            for j in range(1, ns + 1):
                n += 1
                win[sub == j] = n
                again.append(n)
        if not again:
            break
        todo = again
    return labels, n


def nucleus_candidates(
    img: np.ndarray, px_um: float, cfg: DetectorConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Candidate nuclei of ``img`` (pixel size ``px_um`` µm).

    Returns (od (H,W,3), feature (H,W), labels (H,W) int32 of grouped nuclei, list of feature
    dicts indexed by label - 1).
    """
    bg = background_rgb(img)
    od = optical_density(img, bg)
    feat = smooth(nucleus_feature(od), 0.4 / px_um)
    # adaptive part: the split between stained cells and the darkest (nuclear) class, so a
    # strongly stained field does not turn its red cells into nuclei
    sample = feat.ravel()[:: max(1, feat.size // 200_000)]
    stained = sample[sample > cfg.nucleus_threshold * 0.5]
    t_adapt = otsu(stained) if stained.size > 50 else cfg.nucleus_threshold
    thr = max(cfg.nucleus_threshold, min(t_adapt, 3.0 * cfg.nucleus_threshold))
    mask = (feat > thr).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, disk(0.5 / px_um))
    labels, n = _group_lobes(mask, px_um, cfg)
    labels, n = _split_chains(labels, n, feat, thr, px_um, cfg)
    px_area = px_um * px_um
    feats: list[dict] = []
    objs = ndi.find_objects(labels, max_label=n)
    for i, sl in enumerate(objs, start=1):
        if sl is None:
            feats.append({})
            continue
        m = labels[sl] == i
        area = float(m.sum()) * px_area
        f_in = feat[sl][m]
        # a ring around the nucleus (cytoplasm/neighbours) for contrast
        pad = max(int(round(2.0 / px_um)), 1)
        y0, y1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, labels.shape[0])
        x0, x1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, labels.shape[1])
        big = labels[y0:y1, x0:x1] == i
        ring = cv2.dilate(big.astype(np.uint8), disk(pad)).astype(bool) & ~big
        f_ring = feat[y0:y1, x0:x1][ring]
        odn = od[sl][m]
        ys, xs = np.nonzero(m)
        hh, ww = m.shape
        fill = m.sum() / max(hh * ww, 1)
        nfrag = int(ndi.label(m)[1])
        feats.append(
            {
                "area_um2": area,
                "feat_mean": float(f_in.mean()),
                "feat_p90": float(np.percentile(f_in, 90)),
                "feat_ring": float(f_ring.mean()) if f_ring.size else 0.0,
                "thr": float(thr),
                "od_r": float(odn[:, 0].mean()),
                "od_g": float(odn[:, 1].mean()),
                "od_b": float(odn[:, 2].mean()),
                "extent_um": float(max(hh, ww) * px_um),
                "fill": float(fill),
                "n_frag": nfrag,
                "bg_sum": float(bg.sum()),
                "border": float(
                    sl[0].start == 0
                    or sl[1].start == 0
                    or sl[0].stop == labels.shape[0]
                    or sl[1].stop == labels.shape[1]
                ),
                "cy": float(sl[0].start + ys.mean()),
                "cx": float(sl[1].start + xs.mean()),
            }
        )
    return od, feat, labels, feats


def _color_score(fe: dict) -> float:
    """Fallback score in [0, 1]: nuclear colour contrast against the surroundings."""
    contrast = fe["feat_mean"] - fe["feat_ring"]
    return float(np.clip(contrast / max(fe["thr"], 1e-6), 0.0, 1.0))


def _cell_regions(
    od: np.ndarray, labels: np.ndarray, keep: list[int], px_um: float, cfg: DetectorConfig
) -> dict[int, tuple[tuple[slice, slice], np.ndarray]]:
    """Whole-cell mask of each kept nucleus as (window slices, bool mask within the window).

    Cell vs glass is split low (pale cytoplasm is close to the glass); touching red cells are
    separated by a watershed of the distance map seeded by the nucleus and by distance peaks
    at least a red-cell radius deep. Computed in a window around each nucleus only (a tile
    has few white cells), limited to ``max_cell_diameter_um``.
    """
    total = smooth(od.sum(-1), 0.5 / px_um)
    t = cell_threshold(total, 0.4)
    rmax = cfg.max_cell_diameter_um / 2 / px_um
    margin = int(np.ceil(rmax + 4.0 / px_um))
    H, W = labels.shape
    kept = np.isin(labels, keep)
    out = {}
    for k in keep:
        ys, xs = np.nonzero(labels == k)
        cy, cx = ys.mean(), xs.mean()
        y0, y1 = max(int(ys.min()) - margin, 0), min(int(ys.max()) + margin + 1, H)
        x0, x1 = max(int(xs.min()) - margin, 0), min(int(xs.max()) + margin + 1, W)
        win = (slice(y0, y1), slice(x0, x1))
        lab = labels[win]
        nuc_all = kept[win]
        fg = (total[win] > t).astype(np.uint8)
        fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, disk(0.6 / px_um))
        fg = ndi.binary_fill_holes(fg) | nuc_all
        dist = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 5)
        far = cv2.dilate(nuc_all.astype(np.uint8), disk(4.0 / px_um)) == 0
        mx = ndi.maximum_filter(dist, size=max(int(5.0 / px_um), 3))
        peaks = (dist == mx) & (dist > 2.0 / px_um) & far
        plab, _ = ndi.label(peaks)
        markers = np.where(plab > 0, plab + 2, 0).astype(np.int32)
        markers[nuc_all] = 2  # other white cells compete too
        markers[lab == k] = 1
        ws = segmentation.watershed(-dist, markers, mask=fg)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        m = (ws == 1) & ((yy - cy) ** 2 + (xx - cx) ** 2 <= rmax * rmax)
        out[k] = (win, m | (lab == k))
    return out


def _touches(a, b) -> bool:
    """Whether two windowed masks touch or overlap (8-connectivity)."""
    (ay, ax), am = a
    (by, bx), bm = b
    y0, y1 = max(ay.start, by.start) - 1, min(ay.stop, by.stop) + 1
    x0, x1 = max(ax.start, bx.start) - 1, min(ax.stop, bx.stop) + 1
    if y1 <= y0 or x1 <= x0:
        return False
    h, w = y1 - y0, x1 - x0

    def paste(win, m):
        out = np.zeros((h, w), np.uint8)
        sy0, sx0 = max(win[0].start, y0), max(win[1].start, x0)
        sy1, sx1 = min(win[0].stop, y1), min(win[1].stop, x1)
        if sy1 > sy0 and sx1 > sx0:
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = m[
                sy0 - win[0].start : sy1 - win[0].start, sx0 - win[1].start : sx1 - win[1].start
            ]
        return out

    pa = cv2.dilate(paste((ay, ax), am), np.ones((3, 3), np.uint8))
    return bool((pa & paste((by, bx), bm)).any())


def _candidates(rgb: np.ndarray, mpp: float, cfg: DetectorConfig):
    img, scale = _work_image(rgb, mpp, cfg)
    px_um = mpp / scale
    od, _feat, labels, feats = nucleus_candidates(img, px_um, cfg)
    cand = []
    for i, fe in enumerate(feats):
        # a nucleus cut by the image border shows only part of its area
        lo = cfg.min_nucleus_area_um2 * (0.34 if fe and fe["border"] else 1.0)
        if fe and lo <= fe["area_um2"] <= cfg.max_nucleus_area_um2:
            # centroid in px of rgb
            fe["x"] = (fe["cx"] + 0.5) / scale - 0.5
            fe["y"] = (fe["cy"] + 0.5) / scale - 0.5
            cand.append((i + 1, fe))
    return scale, px_um, od, labels, cand


def candidate_features(
    rgb: np.ndarray, mpp: float, config: DetectorConfig | None = None
) -> list[dict]:
    """Feature dicts of every size-plausible nucleus candidate (``x``, ``y`` in px of ``rgb``);
    what the verifier scores. Used to train it."""
    check_rgb(rgb)
    cfg = config if config is not None else DetectorConfig()
    return [fe for _, fe in _candidates(rgb, _check_mpp(mpp), cfg)[4]]


def detect_wbc(
    rgb: np.ndarray, mpp: float, config: DetectorConfig | None = None
) -> list[Detection]:
    """White blood cells in ``rgb`` ((H, W, 3) uint8 at ``mpp`` µm/px).

    Returns one :class:`Detection` per nucleated cell (a multi-lobed nucleus is one cell), in
    reading order (top to bottom, then left to right), coordinates in px of ``rgb``. Sizes are
    physical (``config`` in µm), so the same settings work at any magnification.
    """
    check_rgb(rgb)
    mpp = _check_mpp(mpp)
    cfg = config if config is not None else DetectorConfig()
    if not isinstance(cfg, DetectorConfig):
        raise ConfigError(f"config: expected a DetectorConfig, got {type(cfg).__name__}")
    scale, px_um, od, labels, cand = _candidates(rgb, mpp, cfg)
    from pipeline.detection._verifier import score_candidates

    keep: list[int] = []
    scores: dict[int, float] = {}
    if cfg.use_verifier:
        probs = score_candidates([fe for _, fe in cand])
    else:
        probs = [_color_score(fe) for _, fe in cand]
    for (k, _fe), p in zip(cand, probs, strict=True):
        if p >= cfg.min_score:
            keep.append(k)
            scores[k] = float(p)
    if not keep:
        return []
    feats = {k: fe for k, fe in cand}
    regions = _cell_regions(od, labels, keep, px_um, cfg)
    inv = 1.0 / scale
    H, W = rgb.shape[:2]
    # work-image boxes (x0, y0, x1, y1), exclusive
    wboxes = {}
    for k in keep:
        (sy, sx), m = regions[k]
        ys, xs = np.nonzero(m)
        wboxes[k] = (
            sx.start + xs.min(),
            sy.start + ys.min(),
            sx.start + xs.max() + 1,
            sy.start + ys.max() + 1,
        )
    dets = []
    for k in keep:
        fe = feats[k]
        bx0, by0, bx1, by1 = wboxes[k]
        box = (
            max(int(np.floor(bx0 * inv)), 0),
            max(int(np.floor(by0 * inv)), 0),
            min(int(np.ceil(bx1 * inv)), W),
            min(int(np.ceil(by1 * inv)), H),
        )
        clumped = any(_touches(regions[k], regions[j]) for j in keep if j != k)
        dets.append(
            Detection(
                bbox=box,
                centroid=(float(fe["x"]), float(fe["y"])),
                area_px=float(regions[k][1].sum() * inv * inv),
                score=scores[k],
                clumped=bool(clumped),
            )
        )
    dets.sort(key=lambda d: (d.centroid[1], d.centroid[0]))
    return dets


#: A nucleus candidate larger than this (µm²; a monocyte's nucleus is ~100-150) is also a
#: candidate at its strongest nuclear stain (:func:`nucleus_points`).
CANDIDATE_SPLIT_UM2 = 150.0


def nucleus_points(rgb: np.ndarray, mpp: float, det: DetectorConfig) -> list[tuple[float, float]]:
    """Candidate points (px of ``rgb``, at ``mpp`` ≥ ``det.working_mpp`` µm/px) of every
    size-plausible nucleus: what :func:`detect_wbc` keeps at ``min_score`` 0 (the same nucleus
    candidates and area rule), without its whole-cell extents, whose cost grows with the square
    of a tile's candidates (a tile of purple-stained red cells holds hundreds). Each nucleus
    gives its centroid; one larger than :data:`CANDIDATE_SPLIT_UM2` also gives its strongest
    nuclear stain, where a white cell's nucleus lies when touching red cells of a purple stain
    joined it (the centroid then lies 7-20 µm off, outside the nucleus)."""
    img, scale = _work_image(rgb, mpp, det)
    px_um = mpp / scale
    _, feat, labels, feats = nucleus_candidates(img, px_um, det)
    objs = ndi.find_objects(labels, max_label=len(feats))
    out: list[tuple[float, float]] = []
    for i, fe in enumerate(feats, start=1):
        # The area rule of _candidates: a nucleus cut by the
        # image border shows only part of its area.
        lo = det.min_nucleus_area_um2 * (0.34 if fe and fe["border"] else 1.0)
        if not fe or not lo <= fe["area_um2"] <= det.max_nucleus_area_um2:
            continue
        out.append(((fe["cx"] + 0.5) / scale - 0.5, (fe["cy"] + 0.5) / scale - 0.5))
        if fe["area_um2"] > CANDIDATE_SPLIT_UM2 and objs[i - 1] is not None:
            sy, sx = objs[i - 1]
            f = np.where(labels[sy, sx] == i, feat[sy, sx], -np.inf)
            ky, kx = np.unravel_index(int(np.argmax(f)), f.shape)
            out.append(((sx.start + kx + 0.5) / scale - 0.5, (sy.start + ky + 0.5) / scale - 0.5))
    return out
