"""Detection stage: one slide in, every white cell out (box, crop, morphometry, QC flags).

``detect_slide(path, config)`` opens the slide, settles its scale (metadata, else the user's
``mpp``, else estimated from red cells), runs :func:`pipeline.detection.detect_wbc` on overlapping
tiles of the pyramid level closest to the detector's working resolution (or, with
``DetectorConfig.max_detect_mpp``, the coarsest level at most that), keeps each cell once across
tile borders, then reads a fixed physical-size square crop around each cell at level 0, resamples
it to ``crop_px`` and measures it with :func:`pipeline.detection.segment_cell`. The square, its
resampling and the red-cell scale estimate are :mod:`hemblip.crops`' and :mod:`hemblip.scale`'s,
the same code that cuts the model's training crops (train/serve parity). The slide is never
decoded whole at full resolution (except a plain image, which is one level).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from hemblip.crops import MAX_CENTRE_SHIFT_UM, centre_offset, crop_box, resample
from hemblip.scale import estimate_image_mpp
from pipeline.detection import DetectorConfig, detect_wbc, segment_cell
from pipeline.errors import ConfigError, ScaleError, SlideTooLargeError
from pipeline.schema import DETECT_COLUMNS
from pipeline.slides import DEFAULT_MAX_DECODE_MB, DEFAULT_MAX_PIXELS, Slide, open_slide

__all__ = ["DetectConfig", "SlideCells", "detect_slide"]

OVERVIEW_MAX_SIDE = 1024
_COLUMN_NAMES = [c[0] for c in DETECT_COLUMNS]
# Cells whose level-0 crop tiles are fetched together (~4 tiles, tens of kB each, per cell).
_CROP_PREFETCH_CELLS = 128


@dataclass(frozen=True)
class DetectConfig:
    """Settings of :func:`detect_slide` (lengths µm; tile sizes px at the detector's working
    resolution ``detector.working_mpp``, or px of the detection level when that is coarser: a
    1024-px tile of a 1.0 µm/px level covers 1 mm). Which level detection reads is
    ``detector.max_detect_mpp``'s rule (:class:`~pipeline.detection.DetectorConfig`).

    ``crop_um``: side of the square crop centred on each cell; ``crop_px``: side it is
    resampled to; ``mpp``: level-0 µm/px for slides whose metadata has none; ``tile_px`` and
    ``overlap_px`` (None: 1.25 x the largest plausible cell) tile the detection level;
    ``max_pixels``: largest plain image / single read accepted; ``max_detect_pixels``: largest
    detection level accepted; ``max_decode_mb``: memory budget in MiB of any one decode (a
    plain image decoded whole, one tile, one read), checked from the header before decoding
    (decompression-bomb guards, :class:`SlideTooLargeError`).
    """

    crop_um: float = 36.0
    crop_px: int = 224
    mpp: float | None = None
    tile_px: int = 1024
    overlap_px: int | None = None
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_detect_pixels: int = 2**32
    max_decode_mb: float = DEFAULT_MAX_DECODE_MB

    def __post_init__(self) -> None:
        def bad(name: str, flag: str, why: str, v: object) -> ConfigError:
            return ConfigError(f"DetectConfig.{name} ({flag}): {why}, got {v!r}")

        if not _finite_pos(self.crop_um) or self.crop_um > 500:
            raise bad("crop_um", "--crop-um", "must be a number of µm in (0, 500]", self.crop_um)
        if not isinstance(self.crop_px, int) or isinstance(self.crop_px, bool) or not 16 <= self.crop_px <= 4096:
            raise bad("crop_px", "--crop-px", "must be an integer in [16, 4096]", self.crop_px)
        if self.mpp is not None and (not _finite_pos(self.mpp) or self.mpp > 50):
            raise bad("mpp", "--mpp", "must be a positive µm-per-pixel value ≤ 50", self.mpp)
        if not isinstance(self.tile_px, int) or isinstance(self.tile_px, bool) or self.tile_px < 128:
            raise bad("tile_px", "--tile-px", "must be an integer ≥ 128", self.tile_px)
        if self.overlap_px is not None and (
            not isinstance(self.overlap_px, int) or not 0 <= self.overlap_px <= self.tile_px // 2
        ):
            raise bad("overlap_px", "--overlap-px", f"must be an integer in [0, {self.tile_px // 2}]", self.overlap_px)
        if not isinstance(self.detector, DetectorConfig):
            raise bad("detector", "detector", "must be a DetectorConfig", type(self.detector).__name__)
        for name in ("max_pixels", "max_detect_pixels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, name, "must be a positive integer", v)
        if not _finite_pos(self.max_decode_mb):
            raise bad("max_decode_mb", "--max-decode-mb", "must be a positive number of MiB", self.max_decode_mb)


def _finite_pos(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass
class SlideCells:
    """Result of :func:`detect_slide` for one slide.

    ``records``: one dict per cell whose keys are exactly ``pipeline.schema.DETECT_COLUMNS``'s
    names, in reading order (``cell_index``); ``crops``: ``(N, crop_px, crop_px, 3)`` uint8, row i
    is record i's crop; ``info``: ``width``, ``height`` (level-0 px), ``mpp``, ``mpp_source``,
    ``format``, ``level_count``, ``detect_level``, ``detect_mpp``, ``tiles``, ``seconds``;
    ``overview``: the whole slide, ``(h, w, 3)`` uint8 with ``max(h, w) ≤ 1024``.
    """

    records: list[dict]
    crops: np.ndarray
    info: dict
    overview: np.ndarray


@dataclass
class _Cell:
    box: tuple[float, float, float, float]  # level-0 px
    centroid: tuple[float, float]
    score: float
    clumped: bool
    diameter_um: float  # from the detector's area (fallback when segmentation finds nothing)


def detect_slide(
    path: str | Path | Slide, config: DetectConfig | None = None, source: str | None = None
) -> SlideCells:
    """Detect, crop and measure every white cell of the slide or image at ``path``.

    ``path`` may also be an already-open :class:`~pipeline.slides.Slide` (e.g. a remote one);
    the caller keeps it and closes it. ``source`` is written to each record's ``source`` column
    (default ``str(path)``, or the slide's ``path``).
    Raises a :class:`pipeline.errors.SlideError` subclass naming the file on any bad input:
    ``SlideOpenError``, ``SlideReadError``, ``SlideTooLargeError``, ``ScaleError``.
    """
    cfg = config if config is not None else DetectConfig()
    t0 = time.perf_counter()
    if isinstance(path, Slide):
        opened = contextlib.nullcontext(path)  # borrowed: the caller closes it
    else:
        opened = open_slide(path, mpp=cfg.mpp, max_pixels=cfg.max_pixels, max_decode_mb=cfg.max_decode_mb)
    with opened as slide:
        mpp, mpp_source = slide.mpp, slide.mpp_source
        if mpp is None and cfg.mpp is not None:
            mpp, mpp_source = float(cfg.mpp), "user"
        if mpp is None:
            mpp = _estimate_scale(slide)
            if mpp is None:
                raise ScaleError(
                    slide.path, "no mpp in metadata, none given (--mpp), and no red cells to estimate it from"
                )
            mpp_source = "estimated"
        level = _detect_level(slide, mpp, cfg.detector)
        lw, lh = slide.level_dimensions[level]
        if lw * lh > cfg.max_detect_pixels:
            raise SlideTooLargeError(
                slide.path,
                f"detection level {level} is {lw}x{lh} px, over the {cfg.max_detect_pixels} px limit",
            )
        cells, overview, n_tiles = _detect_cells(slide, level, mpp, cfg)
        if overview is None:
            overview = _read_overview(slide)
        src = source if source is not None else slide.path if isinstance(path, Slide) else str(path)
        records, crops = _measure(slide, cells, level, mpp, mpp_source, cfg, src)
        info = {
            "width": slide.dimensions[0],
            "height": slide.dimensions[1],
            "mpp": mpp,
            "mpp_source": mpp_source,
            "format": slide.format,
            "level_count": slide.level_count,
            "detect_level": level,
            "detect_mpp": mpp * slide.level_downsamples[level],
            "tiles": n_tiles,
            "seconds": time.perf_counter() - t0,
        }
    return SlideCells(records=records, crops=crops, info=info, overview=overview)


# -- scale ---------------------------------------------------------------------------------------
def _estimate_scale(slide: Slide) -> float | None:
    """Median of red-cell estimates on up to five level-0 windows (centre first)
    (:func:`hemblip.scale.estimate_image_mpp`, the dataset readers' rule too)."""
    w, h = slide.dimensions
    return estimate_image_mpp(lambda box: slide.read(0, box), w, h)


def _detect_level(slide: Slide, mpp: float, detector: DetectorConfig) -> int:
    """Pyramid level detection reads (``mpp``: level-0 µm/px).

    The coarsest level whose mpp is at most ``detector.max_detect_mpp``, else level 0; with
    ``max_detect_mpp`` None, the level closest to ``detector.working_mpp`` (log scale, finer wins
    a tie).
    """
    level_mpps = [mpp * ds for ds in slide.level_downsamples]
    cap = detector.max_detect_mpp
    if cap is None:
        costs = [abs(math.log(m / detector.working_mpp)) for m in level_mpps]
        return min(range(len(costs)), key=lambda i: (round(costs[i], 9), i))
    ok = [i for i, m in enumerate(level_mpps) if m <= cap * (1 + 1e-9)]
    return max(ok, key=lambda i: (level_mpps[i], -i)) if ok else 0


# -- detection on tiles --------------------------------------------------------------------------
def _detect_cells(slide: Slide, level: int, mpp: float, cfg: DetectConfig):
    ds = slide.level_downsamples[level]
    lmpp = mpp * ds
    det = cfg.detector
    # Tile sizes are defined at the working resolution; a finer level needs proportionally more px.
    scale = max(1.0, det.working_mpp / lmpp)
    tile = int(round(cfg.tile_px * scale))
    if cfg.overlap_px is None:
        overlap = int(math.ceil(1.25 * det.max_cell_diameter_um / lmpp))
    else:
        overlap = int(round(cfg.overlap_px * scale))
    overlap = min(overlap, tile // 2)
    stride = tile - overlap
    lw, lh = slide.level_dimensions[level]
    xs = _starts(lw, tile, stride)
    ys = _starts(lh, tile, stride)

    f = max(lw, lh) / OVERVIEW_MAX_SIDE
    build_overview = f >= 1.0 and _overview_level(slide) is None
    overview = None
    if build_overview:
        ow, oh = max(1, int(lw / f)), max(1, int(lh / f))
        overview = np.full((oh, ow, 3), 255, np.uint8)

    cells: list[_Cell] = []
    for j, ty in enumerate(ys):
        # A remote slide fetches the whole row band in one batch of concurrent requests.
        slide.prefetch(level, [(tx, ty, min(tx + tile, lw), min(ty + tile, lh)) for tx in xs])
        for i, tx in enumerate(xs):
            x1, y1 = min(tx + tile, lw), min(ty + tile, lh)
            rgb = slide.read(level, (tx, ty, x1, y1))
            # The cores (tile minus half the overlap on inner sides) partition the level: a
            # cell belongs to the tile whose core holds its centroid, where it is seen whole.
            # Nominal starts (k * stride), not the last tile's shifted one, keep cores disjoint.
            cx0 = i * stride + overlap / 2 if i > 0 else -math.inf
            cy0 = j * stride + overlap / 2 if j > 0 else -math.inf
            cx1 = (i + 1) * stride + overlap / 2 if i < len(xs) - 1 else math.inf
            cy1 = (j + 1) * stride + overlap / 2 if j < len(ys) - 1 else math.inf
            if overview is not None:
                _paste_overview(overview, rgb, tx, ty, f, (cx0, cy0, cx1, cy1))
            if rgb.shape[0] < 2 or rgb.shape[1] < 2:
                continue
            for d in detect_wbc(rgb, lmpp, det):
                gx, gy = tx + d.centroid[0], ty + d.centroid[1]
                if not (cx0 <= gx < cx1 and cy0 <= gy < cy1):
                    continue
                bx0, by0, bx1, by1 = d.bbox
                cells.append(
                    _Cell(
                        box=((tx + bx0) * ds, (ty + by0) * ds, (tx + bx1) * ds, (ty + by1) * ds),
                        centroid=(gx * ds, gy * ds),
                        score=float(d.score),
                        clumped=bool(d.clumped),
                        diameter_um=math.sqrt(4.0 * float(d.area_px) / math.pi) * lmpp,
                    )
                )
    return _dedup(cells), overview, len(xs) * len(ys)


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    n = int(math.ceil((length - tile) / stride)) + 1
    return [min(k * stride, length - tile) if k == n - 1 else k * stride for k in range(n)]


def _dedup(cells: list[_Cell]) -> list[_Cell]:
    """Drop a cell when it and a higher-scoring cell each hold the other's centroid in their box
    (two detections of one cell, e.g. where a slide-border tile's core met its neighbour's)."""
    g = max([max(c.box[2] - c.box[0], c.box[3] - c.box[1]) for c in cells] + [1.0])
    grid: dict[tuple[int, int], list[_Cell]] = {}
    kept: list[_Cell] = []
    for c in sorted(cells, key=lambda c: -c.score):
        x, y = c.centroid
        gx, gy = int(x // g), int(y // g)
        # A box holding c's centroid has its own centroid within one box side (≤ g) of it.
        near = (o for dx in (-1, 0, 1) for dy in (-1, 0, 1) for o in grid.get((gx + dx, gy + dy), ()))
        if any(_holds(o.box, c.centroid) and _holds(c.box, o.centroid) for o in near):
            continue
        kept.append(c)
        grid.setdefault((gx, gy), []).append(c)
    # Reading order: top to bottom, then left to right.
    kept.sort(key=lambda c: (c.centroid[1], c.centroid[0]))
    return kept


def _holds(box, pt) -> bool:
    return box[0] <= pt[0] < box[2] and box[1] <= pt[1] < box[3]


# -- overview ------------------------------------------------------------------------------------
def _overview_level(slide: Slide) -> int | None:
    """Finest level that fits the overview size, if any."""
    for lv, (w, h) in enumerate(slide.level_dimensions):
        if max(w, h) <= OVERVIEW_MAX_SIDE:
            return lv
    return None


def _read_overview(slide: Slide) -> np.ndarray:
    lv = _overview_level(slide)
    if lv is None:  # not reached: _detect_cells builds it from its tiles in that case
        lv = slide.level_count - 1
    w, h = slide.level_dimensions[lv]
    img = slide.read(lv, (0, 0, w, h))
    side = max(w, h)
    if side > OVERVIEW_MAX_SIDE:
        f = side / OVERVIEW_MAX_SIDE
        img = cv2.resize(img, (max(1, int(w / f)), max(1, int(h / f))), interpolation=cv2.INTER_AREA)
    return img


def _paste_overview(ov: np.ndarray, rgb: np.ndarray, tx: int, ty: int, f: float, core) -> None:
    oh, ow = ov.shape[:2]
    th, tw = rgb.shape[:2]
    # Paste only the tile's core so overlapping tiles do not double-write.
    x0 = max(tx, core[0]) if math.isfinite(core[0]) else tx
    y0 = max(ty, core[1]) if math.isfinite(core[1]) else ty
    x1 = min(tx + tw, core[2]) if math.isfinite(core[2]) else tx + tw
    y1 = min(ty + th, core[3]) if math.isfinite(core[3]) else ty + th
    ox0, oy0 = int(x0 / f), int(y0 / f)
    ox1, oy1 = min(int(x1 / f), ow), min(int(y1 / f), oh)
    if ox1 <= ox0 or oy1 <= oy0:
        return
    part = rgb[int(y0) - ty : int(y1) - ty, int(x0) - tx : int(x1) - tx]
    ov[oy0:oy1, ox0:ox1] = cv2.resize(part, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA)


# -- crops, morphometry, QC ----------------------------------------------------------------------
def _measure(slide: Slide, cells: list[_Cell], level: int, mpp: float, mpp_source: str, cfg: DetectConfig, source: str):
    # Coordinates come from a coarser level: a box within one level px of the border touches it.
    tol = slide.level_downsamples[level]
    crops = np.empty((len(cells), cfg.crop_px, cfg.crop_px, 3), np.uint8)
    records: list[dict | None] = [None] * len(cells)
    boxes = np.array([c.box for c in cells], dtype=np.float64).reshape(-1, 4)

    crop_boxes = [crop_box(c.centroid, mpp, cfg.crop_um) for c in cells]  # level-0 px
    # The crop's centre may move onto the nucleus (hemblip.crops.centre_offset): fetch that margin too.
    m = int(math.ceil(MAX_CENTRE_SHIFT_UM / mpp)) + 1
    # Cells in reading order, in chunks whose level-0 tiles a remote slide fetches in one batch
    # (one request per cell would cost a round trip each); the chunk bounds the bytes held.
    order = sorted(range(len(cells)), key=lambda k: (cells[k].centroid[1], cells[k].centroid[0]))
    for start in range(0, len(order), _CROP_PREFETCH_CELLS):
        chunk = order[start:start + _CROP_PREFETCH_CELLS]
        slide.prefetch(0, [(b[0] - m, b[1] - m, b[2] + m, b[3] + m) for b in (crop_boxes[k] for k in chunk)])
        for idx in chunk:
            records[idx] = _measure_one(slide, cells, idx, crop_boxes[idx], boxes, crops, mpp, mpp_source,
                                        cfg, source, tol)
    return records, crops


def _measure_one(slide: Slide, cells: list[_Cell], idx: int, box: tuple[int, int, int, int], boxes: np.ndarray,
                 crops: np.ndarray, mpp: float, mpp_source: str, cfg: DetectConfig, source: str, tol: float) -> dict:
    """Crop cell ``idx`` into ``crops[idx]``, segment and flag it; its DETECT record."""
    w, h = slide.dimensions
    crop_mpp = cfg.crop_um / cfg.crop_px
    det = cfg.detector
    c = cells[idx]
    cx, cy = c.centroid
    # White outside the slide (the reader's rule): glass, flagged crop_incomplete below.
    square = slide.read(0, box)
    # The crop is centred as training crops are: on the nucleus near the detector's centroid.
    # The record keeps the detector's centroid: from it, any reader of the crop (hemblip caption
    # --center) moves to the same nucleus and cuts the same pixels.
    dx, dy = centre_offset(square, mpp)
    if dx or dy:
        box = crop_box((cx + dx, cy + dy), mpp, cfg.crop_um)
        square = slide.read(0, box)
    x0, y0, x1, y1 = box
    crop = resample(square, cfg.crop_px)
    crops[idx] = crop
    m = segment_cell(crop, crop_mpp)

    bx0, by0, bx1, by1 = c.box
    flags = []
    if bx0 <= tol or by0 <= tol or bx1 >= w - tol or by1 >= h - tol:
        flags.append("slide_edge")
    if not (m.focus_score >= det.min_focus):
        flags.append("out_of_focus")
    if c.clumped or _overlaps_other(boxes, idx):
        flags.append("clumped")
    diam = m.cell_diameter_um if _finite(m.cell_diameter_um) and m.cell_diameter_um > 0 else c.diameter_um
    if not det.min_cell_diameter_um <= diam <= det.max_cell_diameter_um:
        flags.append("implausible_size")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        flags.append("crop_incomplete")

    cyto = tuple(float(v) for v in m.cytoplasm_rgb)
    nuc = tuple(float(v) for v in m.nucleus_rgb)
    rec = {
        "source": source,
        "cell_index": idx,
        "bbox_x0": int(math.floor(bx0)),
        "bbox_y0": int(math.floor(by0)),
        "bbox_x1": int(math.ceil(bx1)),
        "bbox_y1": int(math.ceil(by1)),
        "centroid_x": float(cx),
        "centroid_y": float(cy),
        "mpp": float(mpp),
        "mpp_source": mpp_source,
        "crop_size_um": float(cfg.crop_um),
        "cell_area_um2": _num(m.cell_area_um2),
        "nucleus_area_um2": _num(m.nucleus_area_um2),
        "cell_diameter_um": _num(m.cell_diameter_um),
        "nc_ratio": _num(m.nc_ratio),
        "nucleus_circularity": _num(m.nucleus_circularity),
        "nucleus_lobes": int(m.nucleus_lobes),
        "cytoplasm_r": _num(cyto[0]),
        "cytoplasm_g": _num(cyto[1]),
        "cytoplasm_b": _num(cyto[2]),
        "nucleus_r": _num(nuc[0]),
        "nucleus_g": _num(nuc[1]),
        "nucleus_b": _num(nuc[2]),
        "focus_score": _num(m.focus_score),
        "qc_flags": flags,
    }
    return {k: rec[k] for k in _COLUMN_NAMES}


def _overlaps_other(boxes: np.ndarray, idx: int) -> bool:
    b = boxes[idx]
    ov = (boxes[:, 0] < b[2]) & (boxes[:, 2] > b[0]) & (boxes[:, 1] < b[3]) & (boxes[:, 3] > b[1])
    ov[idx] = False
    return bool(ov.any())


def _finite(v: object) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _num(v: object) -> float | None:
    """A finite float, or None (null in Parquet) when the segmentation could not measure it."""
    return float(v) if _finite(v) else None
