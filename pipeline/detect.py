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

Whole smears (``zones=``): :func:`plan_smear` zones the slide from its low levels
(:func:`pipeline.zones.zone_map`) and splits the chosen zones' level-0 grid cells into region
tasks of bounded area; :func:`detect_region` detects one task: coarse-to-fine on a pyramid with
a level of at most ``DetectConfig.candidate_mpp`` (a 40x scan's 1.0 µm/px level), candidates
over its boxes (plus a one-cell margin) on that level, each verified on the detection level in
the window its crop reads anyway; else on the detection level over its boxes (plus the margin),
tile by tile. :func:`merge_regions` keeps each cell once across region
borders, gives it its ``smear_zone`` and local red-cell density, counts (never drops silently)
the cells that lie outside the chosen zones, and applies the per-slide cell budget
(:func:`pipeline.smear_sampling.spatial_sample`). Glass and excluded zones are never read at
level 0. ``detect_slide(..., zones=...)`` runs the three in one process; a job can run the
region tasks in parallel, each on its own open slide, and commit the slide once.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from hemblip.crops import MAX_CENTRE_SHIFT_UM, centre_offset, crop_box, resample
from hemblip.scale import estimate_image_mpp
from pipeline.detection import DetectorConfig, detect_wbc, nucleus_points, segment_cell
from pipeline.errors import ConfigError, ScaleError, SlideTooLargeError
from pipeline.schema import DETECT_COLUMNS
from pipeline.slides import DEFAULT_MAX_DECODE_MB, DEFAULT_MAX_PIXELS, Slide, open_slide
from pipeline.smear_sampling import balanced_order, spatial_sample
from pipeline.zones import ZONE_NAMES, ZoneMap, ZoneSettings, zone_map_level
from pipeline.zones import zone_map as zone_map_fn

__all__ = [
    "DetectConfig",
    "SlideCells",
    "detect_slide",
    "RegionTask",
    "SmearPlan",
    "RegionCell",
    "plan_smear",
    "check_planned_area",
    "split_regions",
    "detect_region",
    "describe_region",
    "DescribedRegion",
    "merge_regions",
    "merge_described",
    "measure_cells",
]

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

    ``candidate_mpp`` (whole smears, ``detect_slide(..., zones=...)`` only): coarse-to-fine
    detection. Candidates are sought on the coarsest pyramid level whose mpp is at most this
    (a 40x scan's 1.0 µm/px level): every nucleus of plausible size
    (:data:`CANDIDATE_MIN_NUCLEUS_UM2`, unscored) not coloured like the red cells
    (:data:`CANDIDATE_CHROMA`); each is then verified with ``detector`` on the detection level,
    read only in the window its crop needs anyway (:func:`detect_region`). None, or no such
    level coarser than the detection level (a 0.1 µm/px field mosaic): one stage on the
    detection level over the whole region boxes. The whole-slide path ignores it.
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
    #: coarsest level read for whole-smear candidates, µm/px (None: one stage, see above)
    candidate_mpp: float | None = 1.1

    def __post_init__(self) -> None:
        def bad(name: str, flag: str, why: str, v: object) -> ConfigError:
            return ConfigError(f"DetectConfig.{name} ({flag}): {why}, got {v!r}")

        if not _finite_pos(self.crop_um) or self.crop_um > 500:
            raise bad("crop_um", "--crop-um", "must be a number of µm in (0, 500]", self.crop_um)
        if (
            not isinstance(self.crop_px, int)
            or isinstance(self.crop_px, bool)
            or not 16 <= self.crop_px <= 4096
        ):
            raise bad("crop_px", "--crop-px", "must be an integer in [16, 4096]", self.crop_px)
        if self.mpp is not None and (not _finite_pos(self.mpp) or self.mpp > 50):
            raise bad("mpp", "--mpp", "must be a positive µm-per-pixel value ≤ 50", self.mpp)
        if (
            not isinstance(self.tile_px, int)
            or isinstance(self.tile_px, bool)
            or self.tile_px < 128
        ):
            raise bad("tile_px", "--tile-px", "must be an integer ≥ 128", self.tile_px)
        if self.overlap_px is not None and (
            not isinstance(self.overlap_px, int) or not 0 <= self.overlap_px <= self.tile_px // 2
        ):
            raise bad(
                "overlap_px",
                "--overlap-px",
                f"must be an integer in [0, {self.tile_px // 2}]",
                self.overlap_px,
            )
        if not isinstance(self.detector, DetectorConfig):
            raise bad(
                "detector", "detector", "must be a DetectorConfig", type(self.detector).__name__
            )
        for name in ("max_pixels", "max_detect_pixels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, name, "must be a positive integer", v)
        if not _finite_pos(self.max_decode_mb):
            raise bad(
                "max_decode_mb",
                "--max-decode-mb",
                "must be a positive number of MiB",
                self.max_decode_mb,
            )
        if self.candidate_mpp is not None:
            # Below the detector's working resolution a candidate level would cost more than
            # detecting on it directly; above 5 µm/px a white cell is a few px.
            lo = self.detector.working_mpp
            if not _finite_pos(self.candidate_mpp) or not lo <= self.candidate_mpp <= 5.0:
                raise bad(
                    "candidate_mpp",
                    "--candidate-mpp",
                    f"must be None or a number of µm/px in [working_mpp = {lo}, 5]",
                    self.candidate_mpp,
                )


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

    With zones (``detect_slide(..., zones=...)``): ``cell_zones`` holds, per record, its
    ``smear_zone`` and the local red-cell density (``rbc_coverage``: single-cell layers;
    ``rbc_per_1000um2``); ``info`` adds ``zones`` (:meth:`ZoneMap.summary`: per-zone areas mm²),
    ``zone_map_png`` (PNG bytes, described cells as dots), ``select``, ``cells_outside_zones``
    (``{zone: n}`` for every zone not chosen), ``cells_total`` (chosen-zone cells before the
    budget), ``sampled``, ``max_cells``, ``region_tasks``, ``candidates_without_nucleus``
    (detections the nucleus check rejected), ``level0_fraction_planned`` (share of level-0 area
    inside the region boxes: read whole in one stage, searched on the candidate level
    coarse-to-fine), ``candidate_level`` (None: one stage), and coarse-to-fine ``candidates``
    (found on the candidate level), ``verify_windows`` and ``verify_fraction`` (their level-0
    area ÷ the slide's, overlaps counted twice; None in one stage). ``max_cells`` without zones
    adds ``cells_total``, ``sampled`` and ``max_cells`` only.
    """

    records: list[dict]
    crops: np.ndarray
    info: dict
    overview: np.ndarray
    cell_zones: list[dict] = field(default_factory=list)


@dataclass
class RegionCell:
    """One detected cell before measuring (picklable; what a region task returns)."""

    box: tuple[float, float, float, float]  # level-0 px
    centroid: tuple[float, float]
    score: float
    clumped: bool
    diameter_um: float  # from the detector's area (fallback when segmentation finds nothing)


_Cell = RegionCell


def detect_slide(
    path: str | Path | Slide,
    config: DetectConfig | None = None,
    source: str | None = None,
    *,
    zones: bool | ZoneSettings | ZoneMap | None = None,
    select: tuple[str, ...] | list[str] | str = ("monolayer",),
    max_cells: int | None = None,
    seed: int = 0,
    max_task_px: int | None = None,
) -> SlideCells:
    """Detect, crop and measure every white cell of the slide or image at ``path``.

    ``path`` may also be an already-open :class:`~pipeline.slides.Slide` (e.g. a remote one);
    the caller keeps it and closes it. ``source`` is written to each record's ``source`` column
    (default ``str(path)``, or the slide's ``path``).

    ``zones``: None (default) reads the whole slide. True, a :class:`~pipeline.zones.ZoneSettings`
    or a ready :class:`~pipeline.zones.ZoneMap` zones the slide first and describes only the
    cells of the zones in ``select`` (default the monolayer), reading level 0 only inside their
    region boxes (:func:`plan_smear`); cells seen outside them are counted per zone in
    ``info["cells_outside_zones"]``. ``max_cells``: at most this many cells are measured, a
    spatially balanced equal-probability sample (``seed``) of the (chosen zones') cells;
    ``info`` records ``sampled`` and ``cells_total``. ``max_task_px``: level-0 px of one region
    of a zoned read (:func:`plan_smear`; default :data:`MAX_TASK_PX`): regions are read one
    after another, so it bounds the memory of one.
    Raises a :class:`pipeline.errors.SlideError` subclass naming the file on any bad input:
    ``SlideOpenError``, ``SlideReadError``, ``SlideTooLargeError``, ``ScaleError``;
    :class:`~pipeline.zones.ZoneError` when a slide cannot be zoned; ``ConfigError`` for bad
    ``zones``/``select``/``max_cells``/``seed``.
    """
    cfg = config if config is not None else DetectConfig()
    _check_budget(max_cells, seed)
    if max_task_px is not None:
        _check_task_px(max_task_px)  # before the file is opened, not after zoning it
    use_zones = zones is not None and zones is not False
    if use_zones:
        select = _check_select(select)
        if not (zones is True or isinstance(zones, ZoneSettings | ZoneMap)):
            raise ConfigError(
                f"zones must be None, True, ZoneSettings or ZoneMap, got {type(zones).__name__}"
            )
    t0 = time.perf_counter()
    if isinstance(path, Slide):
        opened = contextlib.nullcontext(path)  # borrowed: the caller closes it
    else:
        opened = open_slide(
            path, mpp=cfg.mpp, max_pixels=cfg.max_pixels, max_decode_mb=cfg.max_decode_mb
        )
    with opened as slide:
        mpp, mpp_source = slide.mpp, slide.mpp_source
        if mpp is None and cfg.mpp is not None:
            mpp, mpp_source = float(cfg.mpp), "user"
        if mpp is None:
            mpp = _estimate_scale(slide)
            if mpp is None:
                raise ScaleError(
                    slide.path,
                    "no mpp in metadata, none given (--mpp), and no red cells to estimate it from",
                )
            mpp_source = "estimated"
        level = _detect_level(slide, mpp, cfg.detector)
        lw, lh = slide.level_dimensions[level]
        # A zoned read is limited by the area it plans to detect on (checked once planned): a
        # 5 GP smear's level 0 is over the limit, its monolayer far under it.
        if not use_zones and lw * lh > cfg.max_detect_pixels:
            raise SlideTooLargeError(
                slide.path,
                f"detection level {level} is {lw}x{lh} px, over the {cfg.max_detect_pixels} px limit",
            )
        src = source if source is not None else slide.path if isinstance(path, Slide) else str(path)
        extra: dict = {}
        cell_zones: list[dict] = []
        if use_zones:
            zm = zones if isinstance(zones, ZoneMap) else None
            plan = plan_smear(
                slide,
                cfg,
                zone_settings=None if zones is True or zm else zones,
                zone_map=zm,
                select=select,
                mpp=mpp,
                max_task_px=MAX_TASK_PX if max_task_px is None else max_task_px,
            )
            check_planned_area(slide, plan, cfg, slide.path)
            stats: dict = {}
            described = None
            if max_cells is None:
                # Crops read box by box, while the detection tiles are cached (describe_region).
                parts = [
                    describe_region(
                        slide, t, plan, cfg, mpp_source=mpp_source, source=src, stats=stats
                    )
                    for t in plan.tasks
                ]
                merged, *described = merge_described(plan, parts, cfg.crop_px)
            else:
                # Fields in a spatially balanced order until the budget is met; only the
                # sampled cells are cropped.
                merged = sample_fields(slide, plan, cfg, max_cells, seed, stats)
            cells, cell_zones = merged.cells, merged.cell_zones
            overview = (
                _read_overview(slide)
                if _overview_level(slide) is not None
                else _overview_windows(slide)
            )
            n_tiles = plan.tiles
            extra = {
                "zones": plan.zone_map.summary(),
                "zone_map_png": plan.zone_map.png(512, points=[c.centroid for c in cells]),
                "select": list(plan.select),
                "cells_outside_zones": merged.outside,
                # level-0 (x, y, zone) of each: for evaluation, not stored in slides/
                "cells_outside_points": merged.outside_points,
                "cells_total": merged.cells_total,
                "sampled": merged.sampled,
                "max_cells": max_cells,
                "cells_total_estimated": merged.estimated,
                "fields_read": merged.fields_read,
                "fields_total": merged.fields_total,
                "sampled_area_mm2": (
                    None
                    if merged.area_read_px is None
                    else merged.area_read_px * (plan.mpp / 1000.0) ** 2
                ),
                "region_tasks": len(plan.tasks),
                "candidates_without_nucleus": stats.get("no_nucleus", 0),
                "level0_fraction_planned": plan.level0_fraction,
                "candidate_level": plan.candidate_level,
                "candidates": stats.get("candidates"),
                "verify_windows": stats.get("verify_windows"),
                "verify_fraction": (
                    None
                    if plan.candidate_level is None
                    else stats.get("verify_px", 0)
                    * slide.level_downsamples[level] ** 2
                    / float(slide.dimensions[0] * slide.dimensions[1])
                ),
            }
        else:
            cells, overview, n_tiles = _detect_cells(slide, level, mpp, cfg)
            if overview is None:
                overview = _read_overview(slide)
            if max_cells is not None:
                total = len(cells)
                cells = _budget(cells, max_cells, seed)
                extra = {
                    "cells_total": total,
                    "sampled": len(cells) < total,
                    "max_cells": max_cells,
                }
        if use_zones and described is not None:
            records, crops = described
        else:
            # Coarse-to-fine (the budget's path): crops without the centring margin, as
            # describe_region reads them.
            margin = not (use_zones and plan.candidate_level is not None)
            records, crops = _measure(slide, cells, level, mpp, mpp_source, cfg, src, margin)
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
            **extra,
            "seconds": time.perf_counter() - t0,
        }
    return SlideCells(
        records=records, crops=crops, info=info, overview=overview, cell_zones=cell_zones
    )


def check_planned_area(slide: Slide, plan: SmearPlan, cfg: DetectConfig, name: str) -> None:
    """Raise :class:`SlideTooLargeError` (naming ``name``) when the px a zoned read of ``plan``
    detects on (its region boxes, at the detection level) exceed ``cfg.max_detect_pixels``, the
    guard against reads that would never end; the whole level's size does not count."""
    ds = slide.level_downsamples[plan.level]
    planned = sum(t.area_px for t in plan.tasks) / (ds * ds)
    if planned > cfg.max_detect_pixels:
        raise SlideTooLargeError(
            name,
            f"the chosen zones cover {planned:.0f} px of detection level {plan.level}, over the "
            f"{cfg.max_detect_pixels} px limit",
        )


def _check_task_px(max_task_px: object) -> None:
    if isinstance(max_task_px, bool) or not isinstance(max_task_px, int) or max_task_px < 1:
        raise ConfigError(
            f"max_task_px must be a positive integer of level-0 px, got {max_task_px!r}"
        )


def _check_budget(max_cells: object, seed: object) -> None:
    if max_cells is not None and (
        isinstance(max_cells, bool) or not isinstance(max_cells, int) or max_cells < 1
    ):
        raise ConfigError(
            f"max cells per slide (--max-cells-per-slide) must be an integer >= 1, got {max_cells!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"sampling seed must be an integer in [0, 2**63), got {seed!r}")


def _check_select(select: object) -> tuple[str, ...]:
    names = (select,) if isinstance(select, str) else select
    if not isinstance(names, tuple | list) or not names:
        raise ConfigError(f"--zones: give one or more of {', '.join(ZONE_NAMES)}, got {select!r}")
    out = []
    for z in names:
        if not isinstance(z, str) or z not in ZONE_NAMES:
            raise ConfigError(f"--zones: unknown zone {z!r} (choose from {', '.join(ZONE_NAMES)})")
        if z not in out:
            out.append(z)
    return tuple(out)


def _budget(cells: list[RegionCell], max_cells: int | None, seed: int) -> list[RegionCell]:
    """At most ``max_cells`` of ``cells`` (reading order kept), spatially balanced."""
    if max_cells is None or len(cells) <= max_cells:
        return cells
    idx = spatial_sample(
        np.array([c.centroid for c in cells], np.float64).reshape(-1, 2), max_cells, seed
    )
    return [cells[i] for i in idx]


# -- whole smears: zones, region tasks, merge ----------------------------------------------------
#: Side of the level-0 grid cells region boxes are made of, µm (a 40x scan: 256 px, one
#: scanner tile): a thin or ragged zone is covered tightly. Grid cells are then grouped into
#: blocks of one detection tile each (:func:`split_regions`).
REGION_UM = 32.0
#: The chosen zones' outline is grown by this much (µm, about one white-cell diameter) before
#: grid cells are picked: a cell whose centroid lies just outside the coarse zone raster is still
#: seen (and then zoned by its ring, :func:`cell_zone`). Detection reads half a tile overlap
#: (a cell's size) beyond the boxes on top of it, so every cell centred in a box is seen whole.
REGION_MARGIN_UM = 10.0
#: Blocks are processed in vertical stripes this many blocks wide, row by row, so that the tiles
#: a block shares with the block above (its top margin) are still in a remote slide's decoded-tile
#: cache (64 MiB: ~340 tiles of 256 px) when read again: no tile is fetched twice.
_STRIPE_BLOCKS = 3
#: Largest level-0 area of one region task, px (a 40x scan: ~16 mm²).
MAX_TASK_PX = 256 * 2**20
#: Longest run of grid cells read as one rectangle, in grid cells.
_MAX_RUN_CELLS = 8
#: A cell's zone and red-cell density are read on a ring of this radius (µm) around it: the
#: white cell's own stain raises the smoothed density under it (a monolayer cell read at its
#: centre often looks thick), 60 µm away it does not. Region boxes are grown by it too.
CELL_RING_UM = 60.0
_RING = [(math.cos(a * math.pi / 6), math.sin(a * math.pi / 6)) for a in range(12)]
#: Nucleus check of the smear path. In a monolayer the detector's colour score alone also takes
#: red-cell overlaps and platelet clumps (a generated 72 MP PBC smear: 57 such candidates in the
#: monolayer beside 53 white cells). Overlapping red cells are darker but keep the red cells'
#: colour; a hematoxylin nucleus has another one. So a candidate is a white cell when the
#: optical-density colour (OD per channel ÷ its sum) of its darkest fifth differs from the
#: tile's median stained pixel (mostly red cells) by at least NUCLEUS_CHROMA (L1 distance); OD
#: is against the tile's 99th-percentile colour (glass between the red cells). On generated
#: smears (pipeline.eval_smear): PBC and BCCD white cells are >= 0.22, their false candidates
#: <= 0.09; Raabin and Kaggle overlap (see the eval's numbers).
NUCLEUS_CHROMA = 0.12
#: Second part of the level-0 nucleus check (:func:`_has_nucleus` at NUCLEUS_CHROMA or above): the
#: blue share of the darkest fifth's OD (OD_B ÷ OD sum) is at most this, unless its chroma is
#: NUCLEUS_FAR_CHROMA or more from the red cells'. A Romanowsky nucleus is purple: it lets blue
#: through, and its blue share is low in every stain; a dark overlap of two red cells keeps the
#: red cells' blue-absorbing hue. Generated smears from TXL-PBC train fields (3 PBC, 3 BCCD, 5
#: Raabin, 15 Kaggle slides; the level-0 checks of every detection): white cells 0.236 at most
#: (99th percentile 0.20-0.22 per source); of Kaggle's red-cell overlaps that pass NUCLEUS_CHROMA
#: (14, blue share 0.230-0.285) it drops 8. No white cell was lost by it there. A thin margin
#: (0.236 vs 0.25), so it is a second check, not the main one.
NUCLEUS_MAX_BLUE = 0.25
NUCLEUS_FAR_CHROMA = 0.25


def _tile_stain(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(glass colour, red-cell OD chroma) of a detection tile; chroma None without stained px."""
    sub = rgb[::4, ::4].reshape(-1, 3).astype(np.float32)
    ref = np.maximum(np.percentile(sub, 99, axis=0), 1.0)
    od = -np.log(np.clip(sub / ref, 1e-3, 1.0))
    tot = od.sum(axis=1)
    stained = od[tot > 0.3]
    if not len(stained):
        return ref, None
    med = np.median(stained, axis=0)
    return ref, med / max(float(med.sum()), 1e-6)


def _has_nucleus(
    rgb: np.ndarray,
    bbox,
    ref: np.ndarray,
    red_chroma: np.ndarray | None,
    threshold: float = NUCLEUS_CHROMA,
) -> bool:
    """Whether the darkest fifth of ``bbox`` (px of ``rgb``) differs in OD chroma from the
    tile's red cells (``ref``, ``red_chroma``: :func:`_tile_stain`) by ``threshold`` or more,
    and (at ``threshold`` >= :data:`NUCLEUS_CHROMA`, the level-0 check) has a nucleus's low blue
    share (:data:`NUCLEUS_MAX_BLUE`). The coarse candidates' check (:data:`CANDIDATE_CHROMA`,
    half the threshold for a 2x margin) is colour distance only."""
    if red_chroma is None:
        return True  # no red cells to compare with: the detector's word stands
    x0, y0, x1, y1 = (int(v) for v in bbox)
    px = rgb[max(y0, 0) : y1, max(x0, 0) : x1].reshape(-1, 3).astype(np.float32)
    if not len(px):
        return False
    od = -np.log(np.clip(px / ref, 1e-3, 1.0))
    tot = od.sum(axis=1)
    dark = od[tot >= np.percentile(tot, 80)].mean(axis=0)
    chroma = dark / max(float(dark.sum()), 1e-6)
    dist = float(np.abs(chroma - red_chroma).sum())
    if dist < threshold:
        return False
    if threshold < NUCLEUS_CHROMA or dist >= NUCLEUS_FAR_CHROMA:
        return True
    return float(chroma[2]) <= NUCLEUS_MAX_BLUE


def cell_zone(zm: ZoneMap, x: float, y: float, ring_um: float = CELL_RING_UM) -> dict:
    """Zone and local red-cell density of a white cell centred at level-0 px ``(x, y)``: the most
    common zone on a 12-point ring of ``ring_um`` µm (ties: the centre's zone if tied, else the
    first), and the median density on that ring (``rbc_coverage`` single-cell layers,
    ``rbc_per_1000um2``)."""
    r = ring_um / zm.mpp
    pts = [(x + r * dx, y + r * dy) for dx, dy in _RING]
    zs = [zm.zone_at(px, py) for px, py in pts]
    counts = {z: zs.count(z) for z in zs}
    top = max(counts.values())
    centre = zm.zone_at(x, y)
    zone = centre if counts.get(centre) == top else next(z for z in zs if counts[z] == top)
    dens = [zm.density_at(px, py) for px, py in pts]
    return {
        "smear_zone": zone,
        "rbc_coverage": float(np.median([d["coverage"] for d in dens])),
        "rbc_per_1000um2": float(np.median([d["cells_per_1000um2"] for d in dens])),
    }


@dataclass(frozen=True)
class RegionTask:
    """One unit of detection work: level-0 ``boxes`` (disjoint rectangles of the chosen zones'
    grid; a cell belongs to the box holding its centroid), read at pyramid ``level`` of a slide
    whose level 0 is ``mpp`` µm/px. Small and picklable: a job ships it to a worker, which opens
    the slide itself and calls :func:`detect_region`."""

    index: int
    boxes: tuple[tuple[int, int, int, int], ...]
    level: int
    mpp: float
    #: None: each box is read as one window (box plus half a tile overlap). A level-0 size: the
    #: boxes are grid cells, and consecutive ones in the same ``block_px`` square of a grid from
    #: the origin are one detection window (their bounding box plus the pad), of which only the
    #: boxes plus the pad are read (the rest is left white and costs no detection work).
    block_px: int | None = None
    #: None: cells are detected on ``level`` over the boxes (one stage). A coarser level:
    #: candidates are sought there over the boxes, and each is verified on ``level`` in the
    #: window its crop needs (coarse-to-fine, :attr:`DetectConfig.candidate_mpp`).
    candidate_level: int | None = None

    @property
    def area_px(self) -> int:
        """Level-0 px inside the boxes."""
        return sum(_area(b) for b in self.boxes)


@dataclass
class SmearPlan:
    """:func:`plan_smear`'s result: the ``zone_map``, the chosen zones (``select``), the detection
    ``level`` (where cells are detected, or verified) and level-0 ``mpp``, the region ``tasks``,
    ``tiles`` and ``level0_fraction``, and ``candidate_level``.

    One stage (``candidate_level`` None): ``tiles`` counts the detection tiles over all tasks
    and ``level0_fraction`` is the share of level-0 area inside the tasks' boxes, all of which
    is read. Coarse-to-fine: ``tiles`` counts the candidate level's tiles over all tasks, and
    ``level0_fraction`` is the share of the slide's area in which candidates are sought; level 0
    is read only in the verification windows around candidates, known once they are found
    (``detect_slide``'s ``info["verify_windows"]``)."""

    zone_map: ZoneMap
    select: tuple[str, ...]
    level: int
    mpp: float
    tasks: list[RegionTask]
    tiles: int
    level0_fraction: float
    candidate_level: int | None = None
    #: Side of the grid cells the tasks' boxes are made of, level-0 px (None: not a planned grid).
    grid_px: int | None = None


@dataclass
class MergedCells:
    """:func:`merge_regions`' result: ``cells`` to measure (reading order), ``cell_zones``
    (per cell ``smear_zone``, ``rbc_coverage``, ``rbc_per_1000um2``), ``outside`` (cells seen
    in zones not chosen, ``{zone: n}`` for every such zone), ``cells_total`` (chosen-zone cells
    before the budget), ``sampled`` and ``outside_points`` (each cell counted in ``outside``:
    level-0 centroid x, y and its zone). A budget that read fields until it was reached
    (:func:`sample_fields`) sets ``estimated`` (``cells_total`` scaled from the fields read by
    area), ``fields_read``/``fields_total`` and ``area_read_px`` (level-0 px of the fields read);
    ``outside`` then counts the fields read."""

    cells: list[RegionCell]
    cell_zones: list[dict]
    outside: dict[str, int]
    cells_total: int
    sampled: bool
    outside_points: list[tuple[float, float, str]] = field(default_factory=list)
    estimated: bool = False
    fields_read: int | None = None
    fields_total: int | None = None
    area_read_px: int | None = None


def plan_smear(
    slide: Slide,
    config: DetectConfig | None = None,
    *,
    zone_settings: ZoneSettings | None = None,
    zone_map: ZoneMap | None = None,
    select: tuple[str, ...] | list[str] | str = ("monolayer",),
    mpp: float | None = None,
    region_um: float = REGION_UM,
    max_task_px: int = MAX_TASK_PX,
    tasks: int | None = None,
) -> SmearPlan:
    """Zone ``slide`` (from its low levels, unless ``zone_map`` is given) and split the chosen
    zones into region tasks (:func:`split_regions`): grid cells of ``region_um`` µm holding any
    of ``select``, in tasks of at most ``max_task_px`` level-0 px (or about ``tasks`` tasks).
    ``mpp``: level-0 µm/px (default the slide's). Reads no level-0 pixel of a pyramid.

    With ``config.candidate_mpp`` and a level coarser than the detection level at most that
    fine (:func:`_candidate_level`), the tasks are coarse-to-fine (``candidate_level``): their
    blocks are one candidate-level detection tile each (a 40x scan: ~1 mm)."""
    cfg = config if config is not None else DetectConfig()
    select = _check_select(select)
    if zone_map is None:
        # Zoning reads its level whole: on a slide with no level near 4 µm/px that is level 0,
        # which the size guard must refuse before it is read, not after (a 10 GP single-level
        # TIFF took minutes to zone, and is refused at once when read whole).
        zl = zone_map_level(slide, zone_settings)
        zw, zh = slide.level_dimensions[zl]
        if zw * zh > cfg.max_detect_pixels:
            raise SlideTooLargeError(
                slide.path,
                f"no level coarse enough to zone from: zoning would read level {zl}, {zw}x{zh} "
                f"px, over the {cfg.max_detect_pixels} px limit",
            )
    zm = zone_map if zone_map is not None else zone_map_fn(slide, zone_settings)
    mpp = float(mpp if mpp is not None else slide.mpp if slide.mpp is not None else zm.mpp)
    if not _finite_pos(region_um):
        raise ConfigError(f"region_um must be a positive number of µm, got {region_um!r}")
    level = _detect_level(slide, mpp, cfg.detector)
    ds = slide.level_downsamples[level]
    # Grid cells a whole number of 256-px tiles (a scanner's tile size) and of level px.
    unit = int(128 * max(1, math.ceil(ds)))
    grid = max(unit, int(round(region_um / mpp / unit)) * unit)
    boxes = zm.region_boxes(select, tile_px=grid, margin_um=REGION_MARGIN_UM)
    clevel = _candidate_level(slide, mpp, cfg, level)
    # Blocks are laid out on the level read over the whole boxes: the candidate level when
    # coarse-to-fine, else the detection level.
    blevel = level if clevel is None else clevel
    bds = slide.level_downsamples[blevel]
    tile, overlap = _tile_geometry(slide, blevel, mpp, cfg)
    # One block = one detection tile: its boxes' bounding rectangle plus the half-overlap pad
    # on each side (_rect_tiles) fits one tile, so each px of that level is decoded about once.
    block = max(grid, int((tile - 2 * (overlap // 2 + 1)) * bds) // grid * grid)
    region_tasks = split_regions(
        boxes,
        level=level,
        mpp=mpp,
        max_task_px=max_task_px,
        tasks=tasks,
        block_px=block,
        candidate_level=clevel,
    )
    n_tiles = sum(
        len(_rect_tiles(slide, blevel, b, tile, overlap)[0])
        for t in region_tasks
        for b, _ in _task_windows(t, (overlap // 2 + 1) * bds)
    )
    w, h = slide.dimensions
    frac = sum(t.area_px for t in region_tasks) / float(w * h)
    return SmearPlan(zm, select, level, mpp, region_tasks, n_tiles, frac, clevel, grid)


def _candidate_level(slide: Slide, mpp: float, cfg: DetectConfig, level: int) -> int | None:
    """Level whole-smear candidates are sought on: the coarsest whose mpp is at most
    ``cfg.candidate_mpp`` (``mpp``: level-0 µm/px), when it is coarser than the detection
    ``level``; else None (one stage)."""
    if cfg.candidate_mpp is None:
        return None
    level_mpps = [mpp * d for d in slide.level_downsamples]
    ok = [i for i, m in enumerate(level_mpps) if m <= cfg.candidate_mpp * (1 + 1e-9)]
    if not ok:
        return None
    best = max(ok, key=lambda i: (level_mpps[i], -i))
    return best if level_mpps[best] > level_mpps[level] * (1 + 1e-9) else None


def split_regions(
    boxes,
    *,
    level: int = 0,
    mpp: float = 1.0,
    max_task_px: int = MAX_TASK_PX,
    tasks: int | None = None,
    block_px: int | None = None,
    candidate_level: int | None = None,
) -> list[RegionTask]:
    """Group grid ``boxes`` (level-0 ``(x0, y0, x1, y1)``, from
    :meth:`~pipeline.zones.ZoneMap.region_boxes`) into region tasks of rectangles, and the
    rectangles, in order, into tasks of at most ``max_task_px`` level-0 px each (``tasks``: aim
    at that many tasks of equal area instead, never over ``max_task_px``).

    ``block_px`` None: horizontal runs of adjacent boxes (at most 8 boxes long) are the
    rectangles, in reading order. ``block_px`` (level-0 px, a multiple of the boxes' grid): the
    bounding rectangle of the boxes in each ``block_px`` square of a grid from the origin is one
    rectangle; rectangles go in vertical stripes of 3 blocks, top to bottom, stripe after stripe
    (a block's neighbours above and to the left were read just before it). Tasks are spatially
    compact either way. ``candidate_level``: the tasks' (coarse-to-fine, see
    :class:`RegionTask`)."""
    _check_task_px(max_task_px)
    if tasks is not None and (isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1):
        raise ConfigError(f"tasks must be a positive integer, got {tasks!r}")
    if block_px is not None and (
        isinstance(block_px, bool) or not isinstance(block_px, int) or block_px < 1
    ):
        raise ConfigError(f"block_px must be a positive integer, got {block_px!r}")
    if candidate_level is not None and (
        isinstance(candidate_level, bool)
        or not isinstance(candidate_level, int)
        or candidate_level < 0
    ):
        raise ConfigError(
            f"candidate_level must be None or a level index >= 0, got {candidate_level!r}"
        )
    if block_px is not None:
        return _split_blocks(boxes, level, mpp, max_task_px, tasks, block_px, candidate_level)
    rects: list[tuple[int, int, int, int]] = []
    run = 0
    for b in sorted((tuple(int(v) for v in b) for b in boxes), key=lambda b: (b[1], b[0])):
        last = rects[-1] if rects else None
        if (
            last
            and last[1] == b[1]
            and last[3] == b[3]
            and last[2] == b[0]
            and run < _MAX_RUN_CELLS
        ):
            rects[-1] = (last[0], last[1], b[2], b[3])
            run += 1
        else:
            rects.append(b)
            run = 1
    total = sum((r[2] - r[0]) * (r[3] - r[1]) for r in rects)
    cap = max_task_px if tasks is None else min(max_task_px, max(1, math.ceil(total / tasks)))
    out: list[list[tuple[int, int, int, int]]] = []
    area = 0
    for r in rects:
        a = (r[2] - r[0]) * (r[3] - r[1])
        if not out or area + a > cap:
            out.append([])
            area = 0
        out[-1].append(r)
        area += a
    return [
        RegionTask(i, tuple(bs), level, float(mpp), candidate_level=candidate_level)
        for i, bs in enumerate(out)
    ]


def _split_blocks(
    boxes,
    level: int,
    mpp: float,
    max_task_px: int,
    tasks: int | None,
    block_px: int,
    candidate_level: int | None = None,
):
    groups: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for b in sorted((tuple(int(v) for v in b) for b in boxes), key=lambda b: (b[1], b[0])):
        groups.setdefault((b[0] // block_px, b[1] // block_px), []).append(b)
    order = sorted(groups, key=lambda k: (k[0] // _STRIPE_BLOCKS, k[1], k[0]))
    area_of = {k: sum(_area(b) for b in groups[k]) for k in order}
    total = sum(area_of.values())
    cap = max_task_px if tasks is None else min(max_task_px, max(1, math.ceil(total / tasks)))
    out: list[list[tuple[int, int, int, int]]] = []
    area = 0
    for k in order:
        if not out or (area and area + area_of[k] > cap):
            out.append([])
            area = 0
        out[-1].extend(groups[k])
        area += area_of[k]
    return [
        RegionTask(i, tuple(bs), level, float(mpp), block_px, candidate_level)
        for i, bs in enumerate(out)
    ]


def _task_windows(
    task: RegionTask, pad0: float = 0.0
) -> list[tuple[tuple[int, int, int, int], list]]:
    """``(bounding box, boxes)`` of each detection window of ``task``, in order. ``pad0`` (the
    read margin, level-0 px) is unused: splitting thin blocks into smaller windows was measured
    and did not pay (each window's pad costs as much as the glass it saves)."""
    if task.block_px is None:
        return [(tuple(b), [tuple(b)]) for b in task.boxes]
    groups: list = []
    key = None
    for b in task.boxes:
        k = (b[0] // task.block_px, b[1] // task.block_px)
        if k != key:
            groups.append([b])
            key = k
        else:
            groups[-1].append(b)
    return [
        (
            (
                min(b[0] for b in g),
                min(b[1] for b in g),
                max(b[2] for b in g),
                max(b[3] for b in g),
            ),
            g,
        )
        for g in groups
    ]


def _clip_rects(rects, window) -> list[tuple[int, int, int, int]]:
    """The parts of ``rects`` inside ``window`` (all ``(x0, y0, x1, y1)``, exclusive), empty
    ones left out: what :func:`_read_needed` reads of that window."""
    wx0, wy0, wx1, wy1 = window
    return [
        (max(a, wx0), max(b, wy0), min(c, wx1), min(d, wy1))
        for a, b, c, d in rects
        if a < wx1 and c > wx0 and b < wy1 and d > wy0
    ]


def _read_needed(slide: Slide, level: int, window, rects, band: int = 256) -> np.ndarray:
    """``window`` (level px) of ``slide``, reading only ``rects`` (level px, inside it) in bands
    of ``band`` rows; the rest is the glass colour."""
    wx0, wy0, wx1, wy1 = window
    if len(rects) == 1 and tuple(rects[0]) == tuple(window):
        slide.prefetch(level, [window])
        return slide.read(level, window)
    need = np.zeros((wy1 - wy0, wx1 - wx0), bool)
    for x0, y0, x1, y1 in rects:
        need[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] = True
    spans = []
    for y in range(wy0 - wy0 % band, wy1, band):
        y0, y1 = max(y, wy0), min(y + band, wy1)
        cols = np.flatnonzero(
            np.diff(np.r_[0, need[y0 - wy0 : y1 - wy0].any(axis=0).astype(np.int8), 0])
        )
        spans += [(wx0 + a, y0, wx0 + b, y1) for a, b in zip(cols[::2], cols[1::2])]
    slide.prefetch(level, spans)
    parts = [slide.read(level, b) for b in spans]
    # The rest is painted the glass colour of what was read (its brightest percent), not white:
    # the detector's colour statistics are the tile's, and a white field would skew them.
    px = np.concatenate([p[::8, ::8].reshape(-1, 3) for p in parts] + [np.zeros((0, 3), np.uint8)])
    glass = np.round(np.percentile(px, 99, axis=0)) if len(px) else np.full(3, 255.0)
    out = np.empty((wy1 - wy0, wx1 - wx0, 3), np.uint8)
    out[...] = glass.astype(np.uint8)
    for (x0, y0, x1, y1), p in zip(spans, parts):
        out[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] = p
    return out


def _tile_geometry(slide: Slide, level: int, mpp: float, cfg: DetectConfig) -> tuple[int, int]:
    """Detection tile side and overlap in ``level`` px (the whole-slide path's rule)."""
    lmpp = mpp * slide.level_downsamples[level]
    det = cfg.detector
    scale = max(1.0, det.working_mpp / lmpp)
    tile = int(round(cfg.tile_px * scale))
    if cfg.overlap_px is None:
        overlap = int(math.ceil(1.25 * det.max_cell_diameter_um / lmpp))
    else:
        overlap = int(round(cfg.overlap_px * scale))
    return tile, min(overlap, tile // 2)


def _rect_tiles(slide: Slide, level: int, box, tile: int, overlap: int):
    """Tile starts (level px) covering level-0 ``box`` grown by half an overlap (so a cell whose
    centroid is inside is seen whole), and that grown window's origin."""
    ds = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    pad = overlap // 2 + 1
    rx0 = max(0, int(math.floor(box[0] / ds)) - pad)
    ry0 = max(0, int(math.floor(box[1] / ds)) - pad)
    rx1 = min(lw, int(math.ceil(box[2] / ds)) + pad)
    ry1 = min(lh, int(math.ceil(box[3] / ds)) + pad)
    stride = tile - overlap
    xs = [rx0 + v for v in _starts(rx1 - rx0, tile, stride)]
    ys = [ry0 + v for v in _starts(ry1 - ry0, tile, stride)]
    return [(x, y) for y in ys for x in xs], (rx0, ry0, rx1, ry1), xs, ys


def detect_region(
    slide: Slide,
    task: RegionTask,
    config: DetectConfig | None = None,
    stats: dict | None = None,
    *,
    plan: SmearPlan | None = None,
) -> list[RegionCell]:
    """Detect the white cells whose centroid lies in ``task``'s boxes, on ``slide`` (open; the
    caller closes it).

    One stage: reads ``task.level`` tile by tile (one detection tile, ≤ ``tile_px`` + overlap
    squared, held at a time), never outside the boxes grown by half a tile overlap.
    Coarse-to-fine (``task.candidate_level``): reads ``task.candidate_level`` so over the boxes
    for candidates (:data:`CANDIDATE_MIN_NUCLEUS_UM2`, :data:`CANDIDATE_CHROMA`), and
    ``task.level`` only in the candidates' verification windows (each candidate's crop box,
    grown to :data:`VERIFY_GRID_PX` tiles), where the default detector confirms them
    (:func:`_verify_cells`). With the task's ``plan``, candidates that cannot become cells of
    ``plan.select`` (:func:`_zone_chosen`: on :func:`cell_zone`'s ring the chosen zones trail
    by more than a point) are not verified: pass it wherever :func:`describe_region` gets it
    (``describe_region`` always does), so both find the same cells.

    Candidates whose darkest part has the red cells' colour (:data:`NUCLEUS_CHROMA`) are not
    cells; their number is added to ``stats["no_nucleus"]`` when ``stats`` is given
    (coarse-to-fine also counts ``candidates``, ``candidates_pale``, ``candidates_zone``,
    ``verify_windows``, ``verify_px`` and ``verify_retries``). Cells are not yet deduplicated across boxes
    (:func:`merge_regions` does)."""
    return [c for _, cells in _region_boxes_cells(slide, task, config, stats, plan) for c in cells]


def _region_boxes_cells(
    slide: Slide,
    task: RegionTask,
    config: DetectConfig | None,
    stats: dict | None,
    plan: SmearPlan | None = None,
):
    """Yield ``(box, cells centred in it)`` for each of ``task``'s boxes in order (see
    :func:`detect_region`): a caller can read the box's crops while its tiles are cached.
    Coarse-to-fine tasks yield once per verification group instead (a box may come several
    times, each time with cells not yielded before)."""
    cfg = config if config is not None else DetectConfig()
    if task.candidate_level is not None and task.candidate_level != task.level:
        yield from _coarse_to_fine_cells(slide, task, cfg, stats, plan)
        return
    level, mpp = task.level, task.mpp
    ds = slide.level_downsamples[level]
    lmpp = mpp * ds
    tile, overlap = _tile_geometry(slide, level, mpp, cfg)
    pad = overlap // 2 + 1
    for box, parts in _task_windows(task, pad * ds):
        out: list[RegionCell] = []
        for rgb, tx, ty, (cx0, cy0, cx1, cy1) in _block_tiles(
            slide, level, box, parts, tile, overlap
        ):
            ref, red_chroma = _tile_stain(rgb)
            for d in detect_wbc(rgb, lmpp, cfg.detector):
                gx, gy = tx + d.centroid[0], ty + d.centroid[1]
                if not (cx0 <= gx < cx1 and cy0 <= gy < cy1):
                    continue
                c0 = (gx * ds, gy * ds)
                if _owned_nucleus(rgb, d, parts, c0, ref, red_chroma, stats):
                    out.append(_region_cell(d, tx, ty, ds, lmpp, c0))
            del rgb
        yield box, out


def _owned_nucleus(rgb, d, parts, c0, ref, red_chroma, stats: dict | None) -> bool:
    """Whether detection ``d`` (level-0 centroid ``c0``) is a cell of these boxes: its centroid
    in one of ``parts`` (else another box's cell, or outside the chosen grid) and its darkest
    part not coloured like the red cells (counted in ``stats["no_nucleus"]`` when it is)."""
    if not _in_parts(parts, c0):
        return False
    if not _has_nucleus(rgb, d.bbox, ref, red_chroma):
        if stats is not None:
            stats["no_nucleus"] = stats.get("no_nucleus", 0) + 1
        return False
    return True


def _in_parts(parts, pt, grow: float = 0.0) -> bool:
    """Whether level-0 ``pt`` lies in one of ``parts`` (level-0 boxes) grown by ``grow`` px."""
    x, y = pt
    return any(b[0] - grow <= x < b[2] + grow and b[1] - grow <= y < b[3] + grow for b in parts)


def _region_cell(d, tx: float, ty: float, ds: float, lmpp: float, c0) -> RegionCell:
    """A detection ``d`` of a read at ``(tx, ty)`` (px of a level of downsample ``ds`` and
    ``lmpp`` µm/px) as a level-0 :class:`RegionCell` centred at ``c0``."""
    bx0, by0, bx1, by1 = d.bbox
    return RegionCell(
        box=((tx + bx0) * ds, (ty + by0) * ds, (tx + bx1) * ds, (ty + by1) * ds),
        centroid=c0,
        score=float(d.score),
        clumped=bool(d.clumped),
        diameter_um=math.sqrt(4.0 * float(d.area_px) / math.pi) * lmpp,
    )


def _block_tiles(
    slide: Slide, level: int, box, parts, tile: int, overlap: int, tight: bool = False
):
    """Yield ``(rgb, tx, ty, core)`` for each detection tile of one block (``box``: its
    bounding rectangle, ``parts``: its grid boxes, level-0 px): tiles of ``level`` (px of that
    level, ``tile`` a side, ``overlap``) over ``box`` grown by half an overlap, each read only
    where it meets a part grown by that pad (:func:`_read_needed`). ``core`` (level px) is the
    tile's share of the grown window: the cores partition it as in the whole-slide path, so a
    cell belongs to the tile whose core holds its centroid, where it is seen whole. ``tight``:
    each tile is cut to the bounding box of what it reads (``tx``, ``ty`` move with it; the
    cores do not): no detection work on glass painted beyond the parts (a thin zone band
    crossing a tile), which the one-stage path keeps as it was."""
    ds = slide.level_downsamples[level]
    stride = tile - overlap
    pad = overlap // 2 + 1
    _, (rx0, ry0, rx1, ry1), xs, ys = _rect_tiles(slide, level, box, tile, overlap)
    # Each part grown by the pad, in level px: what detection needs to see.
    need = [
        (
            max(rx0, int(math.floor(b[0] / ds)) - pad),
            max(ry0, int(math.floor(b[1] / ds)) - pad),
            min(rx1, int(math.ceil(b[2] / ds)) + pad),
            min(ry1, int(math.ceil(b[3] / ds)) + pad),
        )
        for b in parts
    ]
    for j, ty in enumerate(ys):
        for i, tx in enumerate(xs):
            x1, y1 = min(tx + tile, rx1), min(ty + tile, ry1)
            if x1 - tx < 2 or y1 - ty < 2:
                continue
            win = (tx, ty, x1, y1)
            sub = _clip_rects(need, win)
            if not sub:
                continue
            cx0 = rx0 + i * stride + overlap / 2 if i > 0 else -math.inf
            cy0 = ry0 + j * stride + overlap / 2 if j > 0 else -math.inf
            cx1 = rx0 + (i + 1) * stride + overlap / 2 if i < len(xs) - 1 else math.inf
            cy1 = ry0 + (j + 1) * stride + overlap / 2 if j < len(ys) - 1 else math.inf
            if tight:
                win = (
                    min(b[0] for b in sub),
                    min(b[1] for b in sub),
                    max(b[2] for b in sub),
                    max(b[3] for b in sub),
                )
            rgb = _read_needed(slide, level, win, sub)
            yield rgb, win[0], win[1], (cx0, cy0, cx1, cy1)


# -- whole smears: coarse-to-fine ----------------------------------------------------------------
#: Candidates of the coarse stage (:attr:`DetectConfig.candidate_mpp`): every nucleus of
#: plausible size (the detector at ``min_score`` 0, unscored), from this area (µm²; the
#: default's 9 µm² loses small nuclei at 1 µm/px). On TXL-PBC val reduced to 1.0 µm/px + JPEG
#: q80 (``pipeline.eval_detect.evaluate_detection(..., detect_mpp=1.0, jpeg_quality=80)``):
#: recall 0.974 at precision 0.94, the level-0 detector's recall (0.974); the default detector
#: there loses 1 % recall. The level-0 verification takes the false candidates out.
CANDIDATE_MIN_NUCLEUS_UM2 = 4.0
#: A candidate goes to verification only when the darkest fifth of the square of half-side
#: CANDIDATE_BOX_UM around it differs from the red cells' colour by at least CANDIDATE_CHROMA
#: (:func:`_has_nucleus` on the candidate level's tile, half the level-0 threshold: a 2x
#: margin). Measured on the candidate level of generated smears (``pipeline.whole_smear``
#: before its one-stain-per-slide change, PBC, BCCD, Kaggle, Raabin, 72-128 MP): candidates in
#: a white cell 0.29-0.46 (median), and every monolayer white cell that had a candidate kept
#: one up to a threshold of 0.10; false candidates (overlapping red cells) 0.03 (median), of
#: which the check keeps 15-40 % (Raabin 4,612 -> 656, PBC 191 -> 83).
CANDIDATE_CHROMA = NUCLEUS_CHROMA / 2
CANDIDATE_BOX_UM = 6.0
#: A cell found on the detection level near a group's border (its crop box not all on the
#: group's tiles) is kept only when a candidate points at it: one lies in its box, or within
#: this distance (µm) of its centroid (the same nucleus seen at two scales moves by ~1 µm; two
#: touching white cells seen as one candidate lie about a nucleus radius either side of it).
VERIFY_RADIUS_UM = 8.0
#: Verification windows are grown to this grid (px of the detection level; a scanner's
#: 256-px tiles): the tiles the crop needs are read whole anyway, and the detector's colour
#: statistics (glass colour, stain split) get their context. Windows that share or touch
#: tiles form one group, read and detected once.
VERIFY_GRID_PX = 256
#: Side of the squares a verification group is cut into for detection, in grid tiles (768 px
#: of the detection level, 192 µm on a 40x scan; each read with a pad of half a tile overlap,
#: 19 µm). Smaller than one stage's 2048-px tiles: the detector's cost per tile grows with
#: (its candidates) x (its area), so a dense patch of candidates (purple-stained red cells)
#: costs in proportion to tile area x patch area. 2 (512 px) costs more in pads, 4 about the
#: same (generated 128 MP PBC smears, 10 % and 40 % monolayer).
VERIFY_TILE_GRIDS = 3
#: Ring points by which a candidate's chosen zones may trail (:func:`_zone_chosen`). 0 and 1
#: gave the same recall and precision on the four eval-smear slides (1: one ring point of
#: slack for the cell's centroid lying a little off its candidate); 2 let in 4-10 % more
#: candidates for nothing.
_ZONE_VOTE_MARGIN = 1


def _candidate_detector(det: DetectorConfig) -> DetectorConfig:
    """``det`` made permissive for candidates (never stricter than ``det``)."""
    return replace(
        det,
        min_score=0.0,
        min_nucleus_area_um2=min(det.min_nucleus_area_um2, CANDIDATE_MIN_NUCLEUS_UM2),
    )


def _verify_window(slide: Slide, level: int, c, mpp: float, crop_um: float):
    """Level px window verifying the candidate at level-0 ``c``: its crop box (what its crop
    reads), grown to :data:`VERIFY_GRID_PX` tiles of ``level`` and clipped to it."""
    ds = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    g = VERIFY_GRID_PX
    b = crop_box(c, mpp, crop_um)
    x0 = max(0, int(math.floor(b[0] / ds)) // g * g)
    y0 = max(0, int(math.floor(b[1] / ds)) // g * g)
    x1 = min(lw, -(-int(math.ceil(b[2] / ds)) // g) * g)
    y1 = min(lh, -(-int(math.ceil(b[3] / ds)) // g) * g)
    return (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))


def _coarse_to_fine_cells(
    slide: Slide,
    task: RegionTask,
    cfg: DetectConfig,
    stats: dict | None,
    plan: SmearPlan | None = None,
):
    """:func:`_region_boxes_cells` of a coarse-to-fine task: candidates on
    ``task.candidate_level`` block by block (the block's tiles, cores and pad as in one stage,
    with the permissive :func:`_candidate_detector`), then :func:`_verify_cells` on
    ``task.level`` block by block. All candidates first: the candidate level's tiles are read
    while still in a remote slide's decoded-tile cache (the zone map's calibration has just
    read most of them), before the level-0 windows of the first blocks push them out."""
    cl = task.candidate_level
    cds = slide.level_downsamples[cl]
    cmpp = task.mpp * cds
    tile, overlap = _tile_geometry(slide, cl, task.mpp, cfg)
    cdet = _candidate_detector(cfg.detector)
    reach = VERIFY_RADIUS_UM / task.mpp  # level-0 px
    r = CANDIDATE_BOX_UM / cmpp  # level px
    found = []
    for box, parts in _task_windows(task, (overlap // 2 + 1) * cds):
        cands: list[tuple[float, float]] = []
        for rgb, tx, ty, (cx0, cy0, cx1, cy1) in _block_tiles(
            slide, cl, box, parts, tile, overlap, tight=True
        ):
            ref, red_chroma = _tile_stain(rgb)
            for x, y in nucleus_points(rgb, cmpp, cdet):
                gx, gy = tx + x, ty + y
                if not (cx0 <= gx < cx1 and cy0 <= gy < cy1):
                    continue
                # Centre of the level px, in level-0 px (px index convention of the detector).
                c0 = ((gx + 0.5) * cds - 0.5, (gy + 0.5) * cds - 0.5)
                # A candidate up to the verify radius outside the parts may still verify to a
                # cell centred in them (the pad read around the parts is wider than that).
                if not _in_parts(parts, c0, reach):
                    continue
                nb = (x - r, y - r, x + r + 1, y + r + 1)
                if not _has_nucleus(rgb, nb, ref, red_chroma, CANDIDATE_CHROMA):
                    if stats is not None:
                        stats["candidates_pale"] = stats.get("candidates_pale", 0) + 1
                    continue  # overlapping red cells: their colour, darker
                if plan is not None and not _zone_chosen(plan, c0):
                    if stats is not None:
                        stats["candidates_zone"] = stats.get("candidates_zone", 0) + 1
                    continue  # a cell of the margin read around the chosen zones
                cands.append(c0)
            del rgb
        found.append((box, parts, cands))
    for box, parts, cands in found:
        yield from _verify_cells(slide, task, box, parts, cands, cfg, stats)


def _zone_chosen(plan: SmearPlan, c0) -> bool:
    """Whether a candidate at level-0 ``c0`` may become a cell of ``plan.select``: on
    :func:`cell_zone`'s ring around it, a chosen zone has at most :data:`_ZONE_VOTE_MARGIN`
    fewer points than the most common other zone. The cell verified from it lies within a few
    µm, and so does its ring: one ring point (31 µm from the next) rarely changes zone, and a
    cell whose ring the chosen zones cannot win would only be counted outside them."""
    zm = plan.zone_map
    r = CELL_RING_UM / zm.mpp
    zs = [zm.zone_at(c0[0] + r * dx, c0[1] + r * dy) for dx, dy in _RING]
    counts = {z: zs.count(z) for z in ZONE_NAMES}
    chosen = max(counts[z] for z in plan.select)
    other = max([counts[z] for z in ZONE_NAMES if z not in plan.select] + [0])
    return chosen >= other - _ZONE_VOTE_MARGIN


def _verify_cells(
    slide: Slide, task: RegionTask, box, parts, cands, cfg: DetectConfig, stats: dict | None
):
    """Yield ``(box, cells)`` per verification group of the block ``box`` (``parts``: its grid
    boxes) holding ``cands`` (level-0 candidate centroids).

    Each candidate's window (:func:`_verify_window`) is a set of :data:`VERIFY_GRID_PX` tiles of
    ``task.level``; windows sharing or touching tiles form one group (candidates a few cells
    apart, or a dense patch), read only on its tiles (:func:`_read_needed`; the rest of a
    detection tile is painted the glass colour) and detected with ``cfg.detector`` (the
    default one) in squares of :data:`VERIFY_TILE_GRIDS` grid tiles, each with a pad of half a
    tile overlap, whose cores (the group's tiles in the square) partition the group: each px
    is detected about once and a cell is found once. A detection is kept when its centroid
    lies on the group's tiles and in ``parts`` (the one-stage ownership rule: a cell is kept
    once across boxes and tasks), it was seen whole or a candidate points at it
    (:func:`_verified`), and it has a nucleus (:func:`_has_nucleus`, else counted in
    ``stats["no_nucleus"]``). A detection on the group's tiles seen only in a square's pad,
    with a candidate within :data:`VERIFY_RADIUS_UM` and no detection of a square's core as
    near, is detected again in a window centred on it (:func:`_retry_window`, read on the
    group's tiles only); a detection there within that radius is kept by the same rules, a
    candidate pointing at it required. ``stats`` also counts ``candidates``,
    ``verify_windows`` (groups), ``verify_px`` (their px of ``task.level``) and
    ``verify_retries``."""
    level, mpp = task.level, task.mpp
    ds = slide.level_downsamples[level]
    lmpp = mpp * ds
    reach = VERIFY_RADIUS_UM / mpp  # level-0 px
    g = VERIFY_GRID_PX
    wins: list[tuple[int, int, int, int]] = []
    wcands: list[list[tuple[float, float]]] = []
    index: dict[tuple[int, int, int, int], int] = {}
    for c in cands:
        w = _verify_window(slide, level, c, mpp, cfg.crop_um)
        k = index.setdefault(w, len(wins))
        if k == len(wins):
            wins.append(w)
            wcands.append([])
        wcands[k].append(c)
    groups = _tile_groups(wins, g)
    if stats is not None:
        stats["candidates"] = stats.get("candidates", 0) + len(cands)
        stats["verify_windows"] = stats.get("verify_windows", 0) + len(groups)
    if not groups:
        return
    lw, lh = slide.level_dimensions[level]
    rects_of = [
        [(tx * g, ty * g, min(lw, (tx + 1) * g), min(lh, (ty + 1) * g)) for tx, ty in tiles]
        for tiles, _ in groups
    ]
    if stats is not None:
        stats["verify_px"] = stats.get("verify_px", 0) + sum(
            (r[2] - r[0]) * (r[3] - r[1]) for rects in rects_of for r in rects
        )
    # One batch of concurrent requests for all of the block's groups (a remote slide).
    slide.prefetch(level, [r for rects in rects_of for r in rects])
    _, overlap = _tile_geometry(slide, level, mpp, cfg)
    pad = overlap // 2 + 1
    bsz = VERIFY_TILE_GRIDS
    for (tiles, members), rects in zip(groups, rects_of):
        cs = np.array([c for k in members for c in wcands[k]], np.float64)
        tset = set(tiles)

        def inner(c0, tset=tset) -> bool:
            # The crop box of a cell centred at level-0 c0 lies on the group's tiles: the
            # cell was seen whole (crop_um > the largest cell).
            b = crop_box(c0, mpp, cfg.crop_um)
            x0, y0 = int(b[0] / ds) // g, int(b[1] / ds) // g
            x1, y1 = int(math.ceil(b[2] / ds) - 1) // g, int(math.ceil(b[3] / ds) - 1) // g
            return all((tx_, ty_) in tset for ty_ in range(y0, y1 + 1) for tx_ in range(x0, x1 + 1))

        # Cores: the group's tiles in each square of bsz x bsz grid tiles (their bounding box);
        # they partition the group, and each is detected with a pad of half a tile overlap (a
        # cell's size) around it, reading only the group's tiles there.
        squares: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for t in tiles:
            squares.setdefault((t[0] // bsz, t[1] // bsz), []).append(t)
        out: list[RegionCell] = []
        # Level-0 centroids of detections in a square's core (seen) and of those only in a
        # square's pad (on the group's tiles): a cell seen only in a pad, not by the square
        # whose core holds it, is detected again in a window centred on it (_retry_window).
        seen: list[tuple[float, float]] = []
        padded: list[tuple[float, float]] = []
        for key in sorted(squares, key=lambda k: (k[1], k[0])):
            st = squares[key]
            core = (
                min(t[0] for t in st) * g,
                min(t[1] for t in st) * g,
                min(lw, (max(t[0] for t in st) + 1) * g),
                min(lh, (max(t[1] for t in st) + 1) * g),
            )
            tx, ty = max(0, core[0] - pad), max(0, core[1] - pad)
            x1, y1 = min(lw, core[2] + pad), min(lh, core[3] + pad)
            sub = _clip_rects(rects, (tx, ty, x1, y1))
            rgb = _read_needed(slide, level, (tx, ty, x1, y1), sub)
            ref, red_chroma = _tile_stain(rgb)
            for d in detect_wbc(rgb, lmpp, cfg.detector):
                gx, gy = tx + d.centroid[0], ty + d.centroid[1]
                if (int(gx) // g, int(gy) // g) not in tset:
                    continue  # centred off the group's tiles (its crop would read beyond them)
                if not (core[0] <= gx < core[2] and core[1] <= gy < core[3]):
                    padded.append((gx * ds, gy * ds))
                    continue
                c0 = (gx * ds, gy * ds)
                seen.append(c0)
                if not _verified(d, tx, ty, ds, c0, cs, reach, inner):
                    continue  # seen cut by the group's border, and no candidate's cell
                if _owned_nucleus(rgb, d, parts, c0, ref, red_chroma, stats):
                    out.append(_region_cell(d, tx, ty, ds, lmpp, c0))
            del rgb
        for p in padded:
            if any(math.hypot(p[0] - q[0], p[1] - q[1]) <= reach for q in seen):
                continue  # its own square saw it (and kept or dropped it by the rules)
            if float(np.hypot(cs[:, 0] - p[0], cs[:, 1] - p[1]).min()) > reach:
                continue  # no candidate's cell
            win = _retry_window(p, ds, pad, cfg.crop_um / lmpp, (lw, lh))
            sub = _clip_rects(rects, win)
            if stats is not None:
                stats["verify_retries"] = stats.get("verify_retries", 0) + 1
            rgb = _read_needed(slide, level, win, sub)
            ref, red_chroma = _tile_stain(rgb)
            tx, ty = win[0], win[1]
            near: list[tuple[float, tuple[float, float], object]] = []
            for d in detect_wbc(rgb, lmpp, cfg.detector):
                gx, gy = tx + d.centroid[0], ty + d.centroid[1]
                c0 = (gx * ds, gy * ds)
                dist = math.hypot(c0[0] - p[0], c0[1] - p[1])
                if dist > reach:
                    continue  # another cell of the window: its own square's
                if (int(gx) // g, int(gy) // g) not in tset:
                    continue
                seen.append(c0)
                near.append((dist, c0, d))
            # The retry looks again at the one cell seen at p, so it judges one detection: the
            # nearest to p. The centred window can cut a cell's nucleus into two groups (a
            # Raabin val smear gave two rows for one cell, each half a nucleus), and trying
            # the next one when the nearest is another box's could keep the other half.
            if near:
                # ties by centroid, never by the detector's output order
                _dist, c0, d = min(near, key=lambda t: (t[0], t[1]))
                # a candidate must point at it
                if _verified(d, tx, ty, ds, c0, cs, reach, lambda _c: False) and _owned_nucleus(
                    rgb, d, parts, c0, ref, red_chroma, stats
                ):
                    out.append(_region_cell(d, tx, ty, ds, lmpp, c0))
            del rgb
        yield box, out


def _retry_window(p, ds: float, pad: int, crop: float, size) -> tuple[int, int, int, int]:
    """Level px window (clipped to the level's ``size``) centred on level-0 ``p``: a cell's
    crop (``crop`` level px a side) plus ``pad`` level px each side, so a cell centred within
    :data:`VERIFY_RADIUS_UM` of ``p`` is seen whole and away from the window's border.

    Why (:func:`_verify_cells`' retry): the detector's nucleus threshold adapts to what its
    image holds (up to 3x ``nucleus_threshold``), and the verifier's inputs are relative to it.
    A verification square mostly of purple-stained red cells (Raabin) can sit at that cap and
    score the white cell in its core below ``min_score``, while the neighbouring square, with
    other content, finds it at up to 1.0 in its pad, which is not its to keep. On 26 generated
    train smears (5 Raabin, 15 Kaggle, 3 PBC, 3 BCCD; 3 x 1.5 mm) that was 5 of the 8 Raabin
    misses left; the retry in a window centred on the cell finds 4 of them (one scored 0.38)
    and adds no false cell there; Kaggle, PBC, BCCD unchanged."""
    h = int(math.ceil(crop / 2)) + pad
    x, y = int(round(p[0] / ds)), int(round(p[1] / ds))
    return (max(0, x - h), max(0, y - h), min(size[0], x + h), min(size[1], y + h))


def _verified(d, tx: int, ty: int, ds: float, c0, cs: np.ndarray, reach: float, inner) -> bool:
    """Whether detection ``d`` (of a read at level px ``(tx, ty)``, centred at level-0 ``c0``)
    is kept by a verification group with candidates ``cs`` (level-0): it lies whole inside the
    group (``inner(c0)``: its crop's tiles are the group's), or a candidate pointed at it (one
    lies in its box, or within ``reach`` level-0 px of its centroid: a cell the coarse level
    saw split or merged with a neighbour)."""
    if inner(c0):
        return True
    if float(np.hypot(cs[:, 0] - c0[0], cs[:, 1] - c0[1]).min()) <= reach:
        return True
    x0, y0, x1, y1 = ((tx + v) * ds for v in d.bbox)
    return bool(((cs[:, 0] >= x0) & (cs[:, 0] < x1) & (cs[:, 1] >= y0) & (cs[:, 1] < y1)).any())


def _tile_groups(wins, g: int) -> list[tuple[list[tuple[int, int]], list[int]]]:
    """Windows ``wins`` (px, on a grid of ``g``) joined where they share or touch grid tiles
    (8-neighbours): ``(tiles, window indices)`` per group, in reading order of each group's
    first tile; tiles in reading order."""
    owner: dict[tuple[int, int], int] = {}
    parent = list(range(len(wins)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    cells: dict[int, list[tuple[int, int]]] = {}
    for k, (x0, y0, x1, y1) in enumerate(wins):
        cells[k] = [
            (tx, ty)
            for ty in range(y0 // g, (y1 - 1) // g + 1)
            for tx in range(x0 // g, (x1 - 1) // g + 1)
        ]
        for tx, ty in cells[k]:
            owner.setdefault((tx, ty), k)
    for k, tiles in cells.items():
        for tx, ty in tiles:
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    o = owner.get((tx + dx, ty + dy))
                    if o is not None:
                        a, b = find(k), find(o)
                        if a != b:
                            parent[max(a, b)] = min(a, b)
    groups: dict[int, tuple[set, list[int]]] = {}
    for k in range(len(wins)):
        tiles, members = groups.setdefault(find(k), (set(), []))
        tiles.update(cells[k])
        members.append(k)
    out = [
        (sorted(tiles, key=lambda t: (t[1], t[0])), members) for tiles, members in groups.values()
    ]
    out.sort(key=lambda gm: (gm[0][0][1], gm[0][0][0]))
    return out


@dataclass
class DescribedRegion:
    """:func:`describe_region`'s result, one entry per detected cell of the task (every zone):
    ``cells``, ``cell_zones`` (:func:`cell_zone`), and for cells of the chosen zones their
    ``records`` (``DETECT_COLUMNS``; ``cell_index`` and the overlap part of ``clumped`` are set
    by :func:`merge_described`) and ``crops`` (``(crop_px, crop_px, 3)`` uint8); None for the
    others."""

    cells: list[RegionCell]
    cell_zones: list[dict]
    records: list[dict | None]
    crops: list[np.ndarray | None]


def describe_region(
    slide: Slide,
    task: RegionTask,
    plan: SmearPlan,
    config: DetectConfig | None = None,
    *,
    mpp_source: str = "metadata",
    source: str = "",
    stats: dict | None = None,
) -> DescribedRegion:
    """:func:`detect_region` and the level-0 crops and morphometry of the task's chosen-zone
    cells, box by box (coarse-to-fine: verification group by group): a box's crops are read
    right after its detection tile, while the tiles they share are still in a remote slide's
    decoded-tile cache (no level-0 tile fetched twice; the part of a crop beyond the box is
    fetched then, once). Cells outside ``plan.select`` are zoned, not measured. Join tasks with
    :func:`merge_described`."""
    cfg = config if config is not None else DetectConfig()
    mpp, tol = task.mpp, slide.level_downsamples[task.level]
    # Coarse-to-fine reads level 0 only where needed: crops without the centring margin.
    c2f = task.candidate_level is not None and task.candidate_level != task.level
    mg = 0 if c2f else _centre_margin(mpp)
    out = DescribedRegion([], [], [], [])
    for _, cells in _region_boxes_cells(slide, task, cfg, stats, plan):
        zones = [cell_zone(plan.zone_map, *c.centroid) for c in cells]
        chosen = [k for k, z in enumerate(zones) if z["smear_zone"] in plan.select]
        crop_boxes = {k: crop_box(cells[k].centroid, mpp, cfg.crop_um) for k in chosen}
        slide.prefetch(
            0, [(b[0] - mg, b[1] - mg, b[2] + mg, b[3] + mg) for b in crop_boxes.values()]
        )
        for k, (c, z) in enumerate(zip(cells, zones)):
            rec = crop = None
            if k in crop_boxes:
                one = np.empty((1, cfg.crop_px, cfg.crop_px, 3), np.uint8)
                rec = _measure_one(
                    slide,
                    [c],
                    0,
                    crop_boxes[k],
                    None,
                    one,
                    mpp,
                    mpp_source,
                    cfg,
                    source,
                    tol,
                    margin=not c2f,
                )
                crop = one[0]
            out.cells.append(c)
            out.cell_zones.append(z)
            out.records.append(rec)
            out.crops.append(crop)
    return out


def merge_described(plan: SmearPlan, parts: list[DescribedRegion], crop_px: int = 224):
    """Join :func:`describe_region` results as :func:`merge_regions` joins cells (each cell once,
    outside-zone cells counted): ``(MergedCells, records, crops)`` with records numbered in
    reading order and ``clumped`` set where a described cell's box overlaps another's."""
    by_id = {}
    for part in parts:
        for c, z, r, cr in zip(part.cells, part.cell_zones, part.records, part.crops):
            by_id[id(c)] = (c, z, r, cr)
    points: list[tuple[float, float, str]] = []
    kept = []
    for c in _dedup([v[0] for v in by_id.values()]):
        entry = by_id[id(c)]
        if entry[2] is None:
            points.append((float(c.centroid[0]), float(c.centroid[1]), entry[1]["smear_zone"]))
        else:
            kept.append(entry)
    boxes = np.array([c.box for c, *_ in kept], dtype=np.float64).reshape(-1, 4)
    records = []
    crops = np.empty((len(kept), crop_px, crop_px, 3), np.uint8)
    for i, (_, _, rec, crop) in enumerate(kept):
        rec = dict(rec, cell_index=i)
        if "clumped" not in rec["qc_flags"] and _overlaps_other(boxes, i):
            rec["qc_flags"] = sorted(rec["qc_flags"] + ["clumped"], key=_QC_ORDER.index)
        records.append(rec)
        crops[i] = crop
    merged = MergedCells(
        [e[0] for e in kept],
        [e[1] for e in kept],
        _outside_counts(plan.select, points),
        len(kept),
        False,
        points,
    )
    return merged, records, crops


_QC_ORDER = ["slide_edge", "out_of_focus", "clumped", "implausible_size", "crop_incomplete"]


def merge_regions(
    plan: SmearPlan, found: list[list[RegionCell]], *, max_cells: int | None = None, seed: int = 0
) -> MergedCells:
    """Join region tasks' cells into the slide's: each cell once (a cell on a box border seen
    from both sides keeps the higher score), zone and red-cell density from ``plan.zone_map``,
    cells outside ``plan.select`` counted per zone (not described), then at most ``max_cells``
    of the rest (spatially balanced sample, ``seed``; see :mod:`pipeline.smear_sampling`)."""
    _check_budget(max_cells, seed)
    zm = plan.zone_map
    cells = _dedup([c for part in found for c in part])
    points: list[tuple[float, float, str]] = []
    kept: list[tuple[RegionCell, dict]] = []
    for c in cells:
        cz = cell_zone(zm, *c.centroid)
        if cz["smear_zone"] in plan.select:
            kept.append((c, cz))
        else:
            points.append((float(c.centroid[0]), float(c.centroid[1]), cz["smear_zone"]))
    total = len(kept)
    if max_cells is not None and total > max_cells:
        idx = spatial_sample(np.array([c.centroid for c, _ in kept], np.float64), max_cells, seed)
        kept = [kept[i] for i in idx]
    return MergedCells(
        [c for c, _ in kept],
        [z for _, z in kept],
        _outside_counts(plan.select, points),
        total,
        len(kept) < total,
        points,
    )


#: Side of a field a per-slide budget reads at a time, µm: about the field of view of a 100x oil
#: objective (0.2-0.25 mm across), the step a manual differential moves by. At 40 white cells
#: per mm² of monolayer a field holds ~2.6; a 200-cell sample reads ~80 fields spread over the
#: chosen zones, not the whole of them.
FIELD_UM = 256.0


def smear_fields(plan: SmearPlan, field_um: float = FIELD_UM) -> list[RegionTask]:
    """``plan``'s boxes grouped into fields: squares of about ``field_um`` µm (a whole number of
    the plan's grid cells) on a grid from the level-0 origin, each a :class:`RegionTask` of the
    boxes whose top-left corner lies in it (read as one window), in reading order. Every box is
    in exactly one field, so a cell (owned by the box holding its centroid) is in one field."""
    if not _finite_pos(field_um):
        raise ConfigError(f"field_um must be a positive number of µm, got {field_um!r}")
    boxes = [b for t in plan.tasks for b in t.boxes]
    if not boxes:
        return []
    grid = plan.grid_px or min(b[3] - b[1] for b in boxes)
    side = max(1, int(round(field_um / plan.mpp / grid))) * grid
    groups: dict[tuple[int, int], list] = {}
    for b in sorted(boxes, key=lambda b: (b[1], b[0])):
        groups.setdefault((b[1] // side, b[0] // side), []).append(tuple(b))
    return [
        RegionTask(i, tuple(groups[k]), plan.level, plan.mpp, side, plan.candidate_level)
        for i, k in enumerate(sorted(groups))
    ]


def sample_fields(
    slide: Slide,
    plan: SmearPlan,
    config: DetectConfig | None,
    max_cells: int,
    seed: int = 0,
    stats: dict | None = None,
) -> MergedCells:
    """The per-slide budget read as a manual differential is: :func:`smear_fields` in a
    spatially balanced order (:func:`~pipeline.smear_sampling.balanced_order`, ``seed``), each
    detected whole (:func:`detect_region`), until the fields read hold at least ``max_cells``
    cells of ``plan.select``; then :func:`merge_regions` keeps a spatially balanced sample of
    ``max_cells`` of them. Level 0 (and a coarse-to-fine plan's candidate level) is read only
    in the fields read: a 200-cell differential of a 5 GP smear reads a few mm², not the
    monolayer. Every field is about equally likely to be read, and every cell of a read field
    is kept or sampled alike, so where cells lie barely weighs on the sample's mix (stopping
    once the budget is met favours the cells of dense fields by about a field's cells over the
    budget: ~1 % at 200 cells).

    ``cells_total`` is then an estimate when not every field was read (``estimated``): the
    chosen-zone cells of the fields read, less one (the stopping rule's bias), times the fields'
    area over the area read, and never less than the cells found; exact (and ``sampled`` false,
    if the budget was not reached) when every field was."""
    _check_budget(max_cells, seed)
    # A one-stage plan's detection depends on the window a cell is seen in: its fields are the
    # plan's own blocks, so reading every field finds the unbudgeted cells (1,024 px fields
    # found 32 cells where the blocks found 30 on one smear). Coarse-to-fine verifies each
    # candidate in a window of its own tiles, and its blocks (~1 mm) are too coarse for fields.
    bp = plan.tasks[0].block_px if plan.tasks else None
    one_stage = plan.candidate_level is None and bp is not None
    fields = smear_fields(plan, bp * plan.mpp) if one_stage else smear_fields(plan)
    if not fields:
        return merge_regions(plan, [], max_cells=max_cells, seed=seed)
    centres = np.array(
        [
            (
                sum((b[0] + b[2]) / 2 * _area(b) for b in f.boxes) / max(f.area_px, 1),
                sum((b[1] + b[3]) / 2 * _area(b) for b in f.boxes) / max(f.area_px, 1),
            )
            for f in fields
        ],
        np.float64,
    )
    found: list[list[RegionCell]] = []
    n = area = 0
    # At least two cells, so that the estimate below has one left after its correction (a
    # budget of 1 stopped at the first field holding a cell and estimated the slide at 1).
    need = max(max_cells, 2)
    zm = plan.zone_map
    for i in balanced_order(centres, seed).tolist():
        cells = detect_region(slide, fields[i], config, stats, plan=plan)
        found.append(cells)
        area += fields[i].area_px
        n += sum(cell_zone(zm, *c.centroid)["smear_zone"] in plan.select for c in cells)
        # detect_region's cells are not deduplicated (a field may return one cell twice): the
        # running count only says when to count the distinct cells.
        if n >= need:
            n = merge_regions(plan, found).cells_total
            if n >= need:
                break
    merged = merge_regions(plan, found, max_cells=max_cells, seed=seed)
    total_area = sum(f.area_px for f in fields)
    every = len(found) == len(fields)
    # Reading stopped at the field that reached the budget, so the fields read hold more cells
    # per area than the slide on average (by about one cell: the count of a Poisson process
    # stopped at its k-th event is k, its unbiased rate (k - 1) / area). In simulation of
    # fields of 0.45-2.6 cells, budgets of 7-200: within 2 % (without the -1: up to +16 %).
    est = max(merged.cells_total - 1, 0) * total_area / area
    total = merged.cells_total if every else max(merged.cells_total, int(round(est)))
    return replace(
        merged,
        cells_total=total,
        sampled=merged.sampled or not every,
        estimated=not every,
        fields_read=len(found),
        fields_total=len(fields),
        area_read_px=int(area),
    )


def _area(b) -> int:
    """Level-0 px of box ``(x0, y0, x1, y1)``."""
    return (b[2] - b[0]) * (b[3] - b[1])


def _outside_counts(select, points) -> dict[str, int]:
    """``{zone: cells}`` of ``points`` for every zone not in ``select`` (0 where none)."""
    outside = {z: 0 for z in ZONE_NAMES if z not in select}
    for *_, z in points:
        outside[z] += 1
    return outside


def measure_cells(
    slide: Slide,
    cells: list[RegionCell],
    level: int,
    mpp: float,
    mpp_source: str,
    config: DetectConfig,
    source: str,
    *,
    sample: list[RegionCell] | None = None,
    start: int = 0,
) -> tuple[list[dict], np.ndarray]:
    """Records (``DETECT_COLUMNS``) and ``(N, crop_px, crop_px, 3)`` crops of ``cells`` (level-0
    crops read in chunks of 128 cells). ``level``: the level the cells were detected on.
    ``sample``: the whole list ``cells`` is the slice ``sample[start:start + N]`` of (a slide's
    cells measured piece by piece): records are numbered from ``start`` and flagged ``clumped``
    where a box overlaps any other cell's of ``sample``, as if measured in one call."""
    records, crops = _measure(slide, cells, level, mpp, mpp_source, config, source)
    if sample is not None:
        boxes = np.array([c.box for c in sample], dtype=np.float64).reshape(-1, 4)
        for j, rec in enumerate(records):
            rec["cell_index"] = start + j
            if "clumped" not in rec["qc_flags"] and _overlaps_other(boxes, start + j):
                rec["qc_flags"] = sorted([*rec["qc_flags"], "clumped"], key=_QC_ORDER.index)
    return records, crops


def _overview_windows(slide: Slide) -> np.ndarray:
    """Overview from the coarsest level, read in windows (no level fits the overview size)."""
    lv = slide.level_count - 1
    w, h = slide.level_dimensions[lv]
    f = max(w, h) / OVERVIEW_MAX_SIDE
    ov = np.full((max(1, int(h / f)), max(1, int(w / f)), 3), 255, np.uint8)
    win = 2048
    for y in range(0, h, win):
        for x in range(0, w, win):
            x1, y1 = min(x + win, w), min(y + win, h)
            _paste_overview(ov, slide.read(lv, (x, y, x1, y1)), x, y, f, (x, y, x1, y1))
    return ov


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
        near = (
            o for dx in (-1, 0, 1) for dy in (-1, 0, 1) for o in grid.get((gx + dx, gy + dy), ())
        )
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
        img = cv2.resize(
            img, (max(1, int(w / f)), max(1, int(h / f))), interpolation=cv2.INTER_AREA
        )
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
def _centre_margin(mpp: float) -> int:
    """Level-0 px a crop's centre may move onto the nucleus (hemblip.crops.centre_offset), + 1."""
    return int(math.ceil(MAX_CENTRE_SHIFT_UM / mpp)) + 1


def _measure(
    slide: Slide,
    cells: list[_Cell],
    level: int,
    mpp: float,
    mpp_source: str,
    cfg: DetectConfig,
    source: str,
    margin: bool = True,
):
    # Coordinates come from a coarser level: a box within one level px of the border touches it.
    tol = slide.level_downsamples[level]
    crops = np.empty((len(cells), cfg.crop_px, cfg.crop_px, 3), np.uint8)
    records: list[dict | None] = [None] * len(cells)
    boxes = np.array([c.box for c in cells], dtype=np.float64).reshape(-1, 4)

    crop_boxes = [crop_box(c.centroid, mpp, cfg.crop_um) for c in cells]  # level-0 px
    # The crop's centre may move onto the nucleus (hemblip.crops.centre_offset): fetch that
    # margin too (``margin``; else _measure_one reads a moved box's new tiles when it moves).
    m = _centre_margin(mpp) if margin else 0
    # Cells in reading order, in chunks whose level-0 tiles a remote slide fetches in one batch
    # (one request per cell would cost a round trip each); the chunk bounds the bytes held.
    order = sorted(range(len(cells)), key=lambda k: (cells[k].centroid[1], cells[k].centroid[0]))
    for start in range(0, len(order), _CROP_PREFETCH_CELLS):
        chunk = order[start : start + _CROP_PREFETCH_CELLS]
        slide.prefetch(
            0, [(b[0] - m, b[1] - m, b[2] + m, b[3] + m) for b in (crop_boxes[k] for k in chunk)]
        )
        for idx in chunk:
            records[idx] = _measure_one(
                slide,
                cells,
                idx,
                crop_boxes[idx],
                boxes,
                crops,
                mpp,
                mpp_source,
                cfg,
                source,
                tol,
                margin,
            )
    return records, crops


def _measure_one(
    slide: Slide,
    cells: list[_Cell],
    idx: int,
    box: tuple[int, int, int, int],
    boxes: np.ndarray,
    crops: np.ndarray,
    mpp: float,
    mpp_source: str,
    cfg: DetectConfig,
    source: str,
    tol: float,
    margin: bool = True,
) -> dict:
    """Crop cell ``idx`` into ``crops[idx]``, segment and flag it; its DETECT record.
    ``margin``: read the crop box with the margin its centre may move in one read (False:
    the box, then the moved box if the centre moves; the same pixels)."""
    w, h = slide.dimensions
    crop_mpp = cfg.crop_um / cfg.crop_px
    det = cfg.detector
    c = cells[idx]
    cx, cy = c.centroid
    # White outside the slide (the reader's rule): glass, flagged crop_incomplete below.
    # One read of the crop box plus the farthest the centre may move (below), then slices of
    # it; or (coarse-to-fine: level-0 tiles are read only where needed) the box alone, and the
    # moved box when the centre moves: on 256-px JPEG tiles the margin read around every crop
    # added a quarter to the crops' level-0 bytes (bench_smear's 0.5 GP slide: 0.170 vs 0.137
    # of the object), while a moved box mostly lies on the tiles just read.
    mg = _centre_margin(mpp) if margin else 0
    wide = slide.read(0, (box[0] - mg, box[1] - mg, box[2] + mg, box[3] + mg))
    square = wide[mg : mg + box[3] - box[1], mg : mg + box[2] - box[0]]
    # The crop is centred as training crops are: on the nucleus near the detector's centroid.
    # The record keeps the detector's centroid: from it, any reader of the crop (hemblip caption
    # --center) moves to the same nucleus and cuts the same pixels.
    dx, dy = centre_offset(square, mpp)
    if dx or dy:
        nb = crop_box((cx + dx, cy + dy), mpp, cfg.crop_um)
        if margin:
            ox, oy = nb[0] - box[0] + mg, nb[1] - box[1] + mg
            box = nb
            square = wide[oy : oy + box[3] - box[1], ox : ox + box[2] - box[0]]
        elif tuple(nb) != tuple(box):
            box = nb
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
    if c.clumped or (boxes is not None and _overlaps_other(boxes, idx)):
        flags.append("clumped")
    diam = (
        m.cell_diameter_um
        if _finite(m.cell_diameter_um) and m.cell_diameter_um > 0
        else c.diameter_um
    )
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
