"""Per-slide CPU stage: read the slide (in place or from a local copy), detect/crop/measure.

Runs as a Ray Data task over one slide reference at a time. A single-object SVS/tiled TIFF on S3
is read in place with ranged GETs of only the tiles detection touches; anything else (local
files, multi-file slides, formats that need the whole file) is staged to the worker's local disk
and the copy removed afterwards. Slide bytes never go through the object store; what leaves the
task are the crops (the object store carries them to the caption actors) and JSON records. Any
failure (transfer after retries, unreadable slide, no scale) becomes the slide's outcome row
with ``status = "failed"``, a one-line reason and a ``failure_class`` decided by the exception's
type (:func:`failure_class`); the task itself never raises, so one bad slide cannot fail the
dataset. A slide whose worker process dies (signal, out of memory, a crash in a decoder) cannot
record anything itself: an :class:`AttemptLedger` actor counts the attempts at each slide across
worker processes, and the attempt after ``max_slide_attempts`` records the slide as
``worker_died`` without opening it.

Output batch keys (one row per cell, then one ``kind == "slide"`` row per slide); every column is
typed (no JSON per cell), so the write stage builds Arrow columns from them without parsing:

``kind``        (N,) object   ``"cell"`` or ``"slide"``
``slide_id``    (N,) object   slide identity (32 hex chars)
``crop``        (N, P, P, 3) uint8   the cell crop (zeros on the slide row); P = ``crop_px``
``thumbnail``   (N,) object   JPEG bytes of the crop (``b""`` when disabled / slide row)
``cell_id``, ``slide_uri``, ``slide_etag``  (N,) object str (``""`` on the slide row)
every :data:`pipeline.schema.DETECT_COLUMNS` name but ``qc_flags``, then the
:data:`pipeline.schema.ZONE_CELL_COLUMNS` (``smear_zone``, ``rbc_density``: ``""``/NaN when
zones are off), with its Arrow type as numpy
                dtype: int32/int64 (0 on the slide row), float64 (NaN = null: not measured, and on
                the slide row), object str (``""`` on the slide row)
``qc_mask``     (N,) int32    bit ``i`` set when the cell carries ``QC_FLAGS[i]``
``outcome``     (N,) object   the slide's outcome row as JSON on the slide row (one per slide:
                a heterogeneous dict the driver needs as a dict), ``""`` on cell rows; its keys
                are :data:`pipeline.schema.SLIDE_COLUMNS` names, ``zone_map_png`` as base64 text
                (JSON has no bytes; the writer decodes it)

Whole smears (``DetectSettings.zones``): the slide is zoned first and only the chosen zones'
cells are described (:func:`pipeline.detect.detect_slide`); the outcome carries the zone areas,
the cells counted outside the chosen zones, ``cells_total``/``sampled``/``cells_total_estimated``
of the per-slide budget (``max_cells``, a spatially balanced sample seeded by the slide id, so a
re-executed task picks the same cells) and the zone-map PNG. With ``zone_min_area_mm2`` (``--zones auto``) only a slide whose
level-0 area is at least that (a whole smear) is zoned; a smaller one (a field mosaic) is read
whole. ``DetectSettings.candidate_mpp`` (``--candidate-mpp``) is the coarse-to-fine candidate
level's limit of every :class:`~pipeline.detect.DetectConfig` the stage builds (one per slide,
shipped to its region tasks); the whole-slide read ignores it.

How each slide was read is stored in ``slides/`` (schema version 3): ``zoning`` (``zoned`` or
``whole``; null when the slide failed before it was decided), ``region_tasks`` (a zoned slide's
regions: with Ray, its region tasks; in one process, those of ``detect_slide``'s own plan),
``region_tasks_fanned_out`` (whether they ran as Ray tasks of their own) and ``candidate_mpp``
(µm/px of the level coarse-to-fine candidates were sought on; null: one stage).

Large slides (region tasks): a zoned slide whose plan (:func:`pipeline.detect.plan_smear`) splits
the chosen zones into more than one region task of at most ``region_task_px`` level-0 px runs
them as Ray tasks of their own (at most ``region_tasks_in_flight`` at a time, ``region_task_cpus``
each), so one gigapixel slide does not serialise the run. Each region task opens the slide
itself (in place; a slide that had to be staged is not fanned out, each task would copy it
again) and returns its cells' records (small, to this task) and crops (a separate object,
fetched one region at a time while the slide's batches are yielded); this task merges them
(:func:`pipeline.detect.merge_described`: each cell once across region borders) and emits the
slide's rows exactly as for one task. A slide with a cell budget is not fanned out: it reads
fields one after another until the budget is met (:func:`pipeline.detect.sample_fields`, a few
mm² for a 200-cell sample), in this task, and ``cells_total`` is then an estimate
(``cells_total_estimated``) unless every field was read. Region tasks are deterministic (a retried one finds the same cells); a region task that fails, or whose worker
dies on every attempt, fails the slide with a one-line reason naming the region task. A zoned
read is limited by the area it plans to detect on (``max_detect_pixels``), not by its detection
level's size: a 5 GP smear's level 0 is over that guard, its monolayer far under it. The outcome
adds keys that are not stored in ``slides/`` (the driver's ``RunResult.slides`` has them):
``zoning_rule`` (``off``, ``chosen``, ``auto_zoned`` or ``auto_whole``: why the slide was zoned
or not, :func:`_zoning`), ``area_mm2``, ``region_workers`` (``host:pid`` of the processes that
ran the region tasks) and ``region_peak_rss_mib``.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline._redact import redact_urls_in
from pipeline.errors import (
    ConfigError,
    SlideError,
    StorageError,
    WorkerDiedError,
    WorkerEnvironmentError,
)
from pipeline.job.identity import cell_id
from pipeline.job.listing import SlidePart, SlideRef
from pipeline.job.storage import S3Settings
from pipeline.schema import DETECT_COLUMNS, QC_FLAGS, ZONE_CELL_COLUMNS
from pipeline.slides import confined_path, open_slide
from pipeline.zones import ZoneError

__all__ = [
    "DetectSettings",
    "AttemptLedger",
    "confined_path",
    "detect_batch",
    "failure_class",
    "ref_to_json",
    "ref_from_json",
    "records",
    "BATCH_KEYS",
    "CELL_FIELDS",
]

_NP_TYPES = {"int32": np.int32, "int64": np.int64, "double": np.float64, "string": object}
#: (name, numpy dtype) of the typed per-cell columns a detect batch carries (see the module doc).
CELL_FIELDS: tuple[tuple[str, object], ...] = (
    ("cell_id", object),
    ("slide_uri", object),
    ("slide_etag", object),
    *((name, _NP_TYPES[str(typ)]) for name, typ, *_ in DETECT_COLUMNS if name != "qc_flags"),
    *((name, _NP_TYPES[str(typ)]) for name, typ, *_ in ZONE_CELL_COLUMNS),
    ("qc_mask", np.int32),
)
BATCH_KEYS = ("kind", "slide_id", "crop", "thumbnail", *(n for n, _ in CELL_FIELDS), "outcome")
_PIECE = 64  # cells per yielded batch: bounds the size of one block in the object store


@dataclass(frozen=True)
class DetectSettings:
    """What a detect task needs (picklable). Sizes: ``crop_um`` µm, ``crop_px`` px."""

    s3: S3Settings
    scratch_dir: str | None = None
    crop_um: float = 36.0
    crop_px: int = 224
    mpp: float | None = None
    thumbnails: bool = True
    thumbnail_px: int = 96
    max_detect_mpp: float | None = None  # None: DetectorConfig's default
    #: zoned slides: coarsest level of coarse-to-fine candidates, µm/px (--candidate-mpp);
    #: None: one stage over the zones' region boxes
    candidate_mpp: float | None = 1.1
    max_slide_attempts: int = 3  # worker deaths on one slide before it is recorded worker_died
    max_decode_mb: float = 1024.0  # decode budget of one read / whole-image decode, MiB
    zones: tuple[str, ...] = ()  # smear zones to describe; () = whole slide, no zone map
    max_cells: int | None = None  # per-slide cell budget (spatially uniform sample); None = all
    #: with ``zones``: zone only slides whose level-0 area is at least this, mm² (--zones auto);
    #: smaller ones are read whole. None: zone every slide.
    zone_min_area_mm2: float | None = None
    #: largest level-0 area of one region task of a zoned slide, px (--region-task-mpx)
    region_task_px: int = 64_000_000
    #: region tasks of one slide running at once as Ray tasks; 0: inside this task, in turn
    region_tasks_in_flight: int = 4
    region_task_cpus: float = 1.0  # CPUs each region task reserves (the job's --detect-cpus)

    def __post_init__(self) -> None:
        # JobConfig checks every setting with its flag; these guard direct construction.
        if self.zone_min_area_mm2 is not None and not self.zone_min_area_mm2 > 0:
            raise ConfigError(
                f"--zone-min-area-mm2 must be a positive number of mm², got {self.zone_min_area_mm2!r}"
            )
        if isinstance(self.region_task_px, bool) or not (
            isinstance(self.region_task_px, int) and self.region_task_px >= 1
        ):
            raise ConfigError(
                f"--region-task-mpx: region_task_px must be a positive integer of level-0 px, "
                f"got {self.region_task_px!r}"
            )
        if isinstance(self.region_tasks_in_flight, bool) or not (
            isinstance(self.region_tasks_in_flight, int) and self.region_tasks_in_flight >= 0
        ):
            raise ConfigError(
                f"--region-tasks-in-flight must be an integer >= 0, got {self.region_tasks_in_flight!r}"
            )
        if not self.region_task_cpus > 0:
            raise ConfigError(f"--detect-cpus must be > 0, got {self.region_task_cpus!r}")
        from pipeline.detect import DetectConfig

        try:
            DetectConfig(candidate_mpp=self.candidate_mpp)
        except ConfigError as exc:
            raise ConfigError(f"--candidate-mpp: {str(exc).split(': ', 1)[-1]}") from None


def ref_to_json(ref: SlideRef) -> str:
    return json.dumps(asdict(ref))


def ref_from_json(text: str) -> SlideRef:
    d = json.loads(text)
    d["parts"] = tuple(SlidePart(**p) for p in d["parts"])
    return SlideRef(**d)


def _jpeg(crop: np.ndarray, side: int) -> bytes:
    """The crop's thumbnail: :func:`hemblip.crops.thumbnail_jpeg`, the one pixel path shared
    with hemblip (bilinear to ``side`` px, JPEG quality 85)."""
    from hemblip.crops import thumbnail_jpeg

    return thumbnail_jpeg(crop, side)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _dumps(record: dict) -> str:
    return json.dumps(record, default=_jsonable)


def _reason(exc: BaseException, local: Path | None, uri: str, where: str = "") -> str:
    """One line: ``Type: uri: [where: ]message`` (``where``: e.g. ``region task 2 of 5``)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if local is not None:
        text = text.replace(str(local), uri)
    if text.startswith(uri):
        text = text[len(uri) :].lstrip(": ")
    text = f"{uri}: {where}: {text}" if where else f"{uri}: {text}"
    # Reasons are stored in slides/ and printed: an endpoint URL in a botocore message may carry
    # credentials or a pre-signed signature.
    return redact_urls_in(f"{type(exc).__name__}: {text}")


# errno values that point at the worker's environment (permissions, a full or read-only disk,
# limits of the local file system or of the process) rather than at storage or the slide.
_CONFIG_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EACCES",
        "EPERM",
        "EROFS",
        "ENOSPC",
        "EDQUOT",
        "ENAMETOOLONG",
        "EMFILE",
        "ENFILE",
        "EXDEV",
    )
    if hasattr(errno, name)
)


def failure_class(exc: BaseException) -> str:
    """What a slide's failure is attributed to (one of :data:`pipeline.schema.FAILURE_CLASSES`),
    from the exception's type, never its text.

    ``slide``: the slide's bytes (:class:`~pipeline.errors.SlideError` subclasses: unreadable,
    truncated, too large, no scale; :class:`~pipeline.zones.ZoneError`: nothing stained to zone);
    permanent for that identity. ``config``: settings or the
    worker's environment (:class:`~pipeline.errors.ConfigError`,
    :class:`~pipeline.errors.WorkerEnvironmentError`, an ``OSError`` for permissions, space or
    name limits, ``MemoryError``: this worker's memory at this concurrency, the bomb guard being
    what settles slides too large for any worker). ``storage``: :class:`~pipeline.errors.StorageError`
    and other ``OSError`` (I/O, connections). ``worker_died``: :class:`~pipeline.errors.WorkerDiedError`.
    Anything else is ``internal`` (a bug). Only ``slide`` and ``worker_died`` are permanent.
    """
    if isinstance(exc, WorkerDiedError):
        return "worker_died"
    if isinstance(exc, ConfigError | WorkerEnvironmentError | MemoryError):
        return "config"
    if isinstance(exc, SlideError | ZoneError):
        return "slide"
    if isinstance(exc, StorageError):
        return "storage"
    if isinstance(exc, OSError):
        return "config" if exc.errno in _CONFIG_ERRNOS else "storage"
    return "internal"


def _empty(dtype, n: int) -> np.ndarray:
    if dtype is object:
        # "" rather than None: Ray Data types an all-None column as float, which then cannot be
        # concatenated with the string column of a block of cells.
        return np.full(n, "", dtype=object)
    return np.full(n, np.nan if dtype is np.float64 else 0, dtype=dtype)


def _qc_mask(flags) -> int:
    mask = 0
    for flag in flags or ():
        mask |= 1 << QC_FLAGS.index(flag)
    return mask


#: ``cell_zones`` key (:class:`pipeline.detect.SlideCells`) of each zone column.
_ZONE_KEYS = {"smear_zone": "smear_zone", "rbc_density": "rbc_coverage"}


def _cell_batch(
    sid: str,
    ref: SlideRef,
    crops: np.ndarray,
    records: list[dict],
    thumbs: list[bytes],
    zones: list[dict] | None = None,
) -> dict[str, np.ndarray]:
    """``zones``: per record its ``SlideCells.cell_zones`` entry, or None (zones off: the zone
    columns are ``""``/NaN, i.e. null)."""
    n = len(records)
    if zones is not None and len(zones) != n:
        raise ValueError(f"{len(zones)} cell zones for {n} cells")
    out: dict[str, np.ndarray] = {
        "kind": np.full(n, "cell", dtype=object),
        "slide_id": np.full(n, sid, dtype=object),
        "crop": crops,
        "thumbnail": np.array(thumbs + [None], dtype=object)[:n],  # the None keeps bytes as objects
    }
    for name, dtype in CELL_FIELDS:
        if name == "cell_id":
            col = [cell_id(sid, r["centroid_x"], r["centroid_y"]) for r in records]
        elif name == "slide_uri":
            col = [ref.uri] * n
        elif name == "slide_etag":
            col = [ref.etag] * n
        elif name == "qc_mask":
            col = [_qc_mask(r.get("qc_flags")) for r in records]
        elif name in _ZONE_KEYS:
            key = _ZONE_KEYS[name]
            got = [None] * n if zones is None else [z.get(key) for z in zones]
            col = (
                [np.nan if v is None else float(v) for v in got]
                if dtype is np.float64
                else ["" if v is None else str(v) for v in got]
            )
        elif dtype is np.float64:
            col = [np.nan if r.get(name) is None else float(r[name]) for r in records]
        else:
            col = [r.get(name) for r in records]
        arr = np.empty(n, dtype=dtype)
        arr[:] = col
        out[name] = arr
    out["outcome"] = np.full(n, "", dtype=object)
    return out


def _new_outcome(ref: SlideRef) -> dict:
    return {
        "slide_id": ref.slide_id,
        "slide_uri": ref.uri,
        "slide_etag": ref.etag,
        "slide_bytes": ref.size,
        "status": "failed",
        "reason": None,
        "failure_class": None,
        "cell_count": 0,
        "mpp": None,
        "mpp_source": None,
        "width": None,
        "height": None,
        "bytes_read": None,
        "stage_seconds": None,
        "detect_seconds": None,
        "zones_selected": None,
        "zone_areas_mm2": None,
        "cells_outside_zones": None,
        "cells_total": None,
        "sampled": None,
        "cells_total_estimated": None,
        "zone_map_png": None,
        # How the slide was read (slides/ columns, schema version 3): zoned | whole; its region
        # tasks (zoned), whether they ran as Ray tasks of their own, and the µm/px of the level
        # coarse-to-fine candidates were sought on (None: one stage).
        "zoning": None,
        "region_tasks": None,
        "region_tasks_fanned_out": None,
        "candidate_mpp": None,
        # Not in slides/ (the driver's RunResult.slides has them).
        "zoning_rule": None,  # off | chosen | auto_zoned | auto_whole (see _zoning)
        "area_mm2": None,  # level-0 area, mm² (--zones auto only)
        "region_workers": None,  # host:pid of the processes that ran them (fanned out only)
        "region_peak_rss_mib": None,  # largest peak RSS of those processes, MiB
    }


def _zone_outcome(info: dict, n_cells: int, zoned: bool) -> dict:
    """The outcome's zone and budget keys from ``detect_slide``'s ``info`` (see the module doc)."""
    total = info.get("cells_total")
    total = n_cells if total is None else int(total)
    out = {
        "cells_total": total,
        "sampled": bool(info.get("sampled", total > n_cells)),
        "cells_total_estimated": bool(info.get("cells_total_estimated", False)),
    }
    if not zoned:
        return out
    png = info.get("zone_map_png")
    return {
        **out,
        "zones_selected": [str(z) for z in info.get("select") or ()],
        "zone_areas_mm2": {
            str(k): float(v) for k, v in (info.get("zones") or {}).get("areas_mm2", {}).items()
        },
        "cells_outside_zones": {
            str(k): int(v) for k, v in (info.get("cells_outside_zones") or {}).items()
        },
        "zone_map_png": base64.b64encode(png).decode("ascii") if png else None,
    }


def _seed(slide_id: str) -> int:
    """The budget's sampling seed: from the slide identity, so every attempt samples alike."""
    try:
        return int(slide_id[:15], 16)
    except ValueError:
        return 0


def records(batch: dict[str, np.ndarray]) -> list[dict]:
    """The rows of a detect batch as dicts (tests, tools): a cell's typed columns with
    ``qc_flags`` rebuilt and NaN as None, or the slide row's outcome. Not used by the job."""
    out = []
    for i, kind in enumerate(batch["kind"]):
        if kind != "cell":
            out.append(json.loads(batch["outcome"][i]))
            continue
        rec = {}
        for name, dtype in CELL_FIELDS:
            value = batch[name][i]
            if name == "qc_mask":
                rec["qc_flags"] = [f for k, f in enumerate(QC_FLAGS) if int(value) >> k & 1]
            elif dtype is np.float64:
                rec[name] = None if np.isnan(value) else float(value)
            else:
                rec[name] = value.item() if isinstance(value, np.generic) else value
        out.append(rec)
    return out


def _slide_batch(ref: SlideRef, settings: DetectSettings, outcome: dict) -> dict[str, np.ndarray]:
    P = settings.crop_px
    out: dict[str, np.ndarray] = {
        "kind": np.array(["slide"], dtype=object),
        "slide_id": np.array([ref.slide_id], dtype=object),
        "crop": np.zeros((1, P, P, 3), np.uint8),
        "thumbnail": np.array([b"", None], dtype=object)[:1],
    }
    for name, dtype in CELL_FIELDS:
        out[name] = _empty(dtype, 1)
    out["outcome"] = np.array([_dumps(outcome)], dtype=object)
    return out


def _detect_config(settings: DetectSettings):
    from pipeline.detect import DetectConfig
    from pipeline.detection import DetectorConfig

    return DetectConfig(
        crop_um=settings.crop_um,
        crop_px=settings.crop_px,
        mpp=settings.mpp,
        max_decode_mb=settings.max_decode_mb,
        detector=DetectorConfig(max_detect_mpp=settings.max_detect_mpp),
        # The one DetectConfig of the slide: the whole-slide and zoned reads, the budget's
        # cropping and every region task (it travels with them) use it.
        candidate_mpp=settings.candidate_mpp,
    )


def _open(ref: SlideRef, settings: DetectSettings, cfg):
    """The slide of ``ref``: a single-object SVS/tiled TIFF on S3 is read in place, anything else
    is staged to scratch (removed when the slide is closed, or when opening fails)."""
    return open_slide(
        ref.uri,
        mpp=settings.mpp,
        max_pixels=cfg.max_pixels,
        max_decode_mb=settings.max_decode_mb,
        storage_options=settings.s3,
        scratch_dir=settings.scratch_dir,
        parts=ref.parts,
        open_rel=ref.open_rel,
    )


@dataclass
class _Cells:
    """A slide's cells as the detect stage emits them: ``info`` (``detect_slide``'s keys the
    outcome uses), ``count`` cells, produced by ``pieces`` as ``(records, crops, cell zones or
    None)`` of at most :data:`_PIECE` cells each; ``extra`` outcome keys (region tasks)."""

    info: dict
    count: int
    pieces: Iterator[tuple[list[dict], np.ndarray, list[dict] | None]]
    extra: dict = field(default_factory=dict)
    bytes_read: Callable[[], int | None] = lambda: None


def _sliced(result, zoned: bool) -> Iterator[tuple[list[dict], np.ndarray, list[dict] | None]]:
    crops = np.ascontiguousarray(result.crops, dtype=np.uint8)
    zones = result.cell_zones if zoned else None
    for start in range(0, len(result.records), _PIECE):
        stop = start + _PIECE
        yield (
            result.records[start:stop],
            crops[start:stop],
            None if zones is None else zones[start:stop],
        )


def _scale(slide) -> tuple[float | None, str | None]:
    """``(level-0 µm/px, mpp_source)`` as :func:`pipeline.detect.detect_slide` settles it: the
    slide's (metadata, or ``--mpp`` for a slide without), else estimated from its red cells
    (:func:`hemblip.scale.estimate_image_mpp`); ``(None, None)`` when there is none."""
    if slide.mpp is not None:
        return float(slide.mpp), slide.mpp_source
    from hemblip.scale import estimate_image_mpp

    w, h = slide.dimensions
    mpp = estimate_image_mpp(lambda box: slide.read(0, box), w, h)
    return (None, None) if mpp is None else (float(mpp), "estimated")


def _zoning(slide, settings: DetectSettings) -> tuple[str, float | None]:
    """``(zoning, level-0 area mm²)``: ``off`` (no zones), ``chosen`` (zones given: every slide
    zoned), ``auto_zoned`` / ``auto_whole`` (``--zones auto``: at least / under
    ``zone_min_area_mm2``). A slide of unknown scale is read whole, and the detection stage
    fails it for that (no scale)."""
    if not settings.zones:
        return "off", None
    if settings.zone_min_area_mm2 is None:
        return "chosen", None
    mpp, _ = _scale(slide)
    if mpp is None:
        return "auto_whole", None
    w, h = slide.dimensions
    area = w * h * (mpp / 1000.0) ** 2
    return ("auto_zoned" if area >= settings.zone_min_area_mm2 else "auto_whole"), area


def _ray_if_running():
    """The ``ray`` module when this process is connected to a Ray cluster (a Ray worker, or a
    driver that initialised it), else None: region tasks then run in this process."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def _find_cells(slide, ref: SlideRef, settings: DetectSettings, cfg, outcome: dict) -> _Cells:
    """Detect the slide's cells: whole, zoned in this process, or zoned in region tasks."""
    from pipeline.detect import check_planned_area, detect_slide, plan_smear

    zoning, area = _zoning(slide, settings)
    outcome["zoning_rule"], outcome["area_mm2"] = zoning, area
    seed = _seed(ref.slide_id)
    if zoning in ("off", "auto_whole"):
        outcome["zoning"] = "whole"
        result = detect_slide(slide, cfg, source=ref.uri, max_cells=settings.max_cells, seed=seed)
        return _Cells(*_from_result(result, False))
    outcome["zoning"] = "zoned"
    select = tuple(settings.zones)
    mpp, mpp_source = _scale(slide)
    if mpp is None:  # detect_slide fails it with its ScaleError (no scale)
        return _Cells(*_from_result(detect_slide(slide, cfg, source=ref.uri, zones=True), True))
    plan = plan_smear(slide, cfg, select=select, mpp=mpp, max_task_px=settings.region_task_px)
    # The size guard counts the px the zoned read plans to detect on, not the whole level: a
    # 5 GP smear's level 0 is over it, its monolayer far under it (detect_slide does the same).
    check_planned_area(slide, plan, cfg, ref.uri)
    ray = _ray_if_running()
    # A staged slide is not fanned out: each region task would copy the whole slide again.
    fan_out = ray is not None and settings.region_tasks_in_flight > 0 and not slide.staged
    fan_out = fan_out and len(plan.tasks) > 1
    # A budget reads fields until it is met (sample_fields): a few mm² in this task, not every
    # region of the chosen zones.
    fan_out = fan_out and settings.max_cells is None
    outcome["region_tasks_fanned_out"] = fan_out
    if plan.tasks and plan.candidate_level is not None:  # no region read: no candidate level
        outcome["candidate_mpp"] = float(mpp * slide.level_downsamples[plan.candidate_level])
    if fan_out:
        return _fan_out(ray, slide, ref, settings, cfg, plan, mpp_source)
    zones = plan.zone_map  # in this process, without zoning the slide again
    result = detect_slide(
        slide,
        cfg,
        source=ref.uri,
        zones=zones,
        select=select,
        max_cells=settings.max_cells,
        seed=seed,
        max_task_px=settings.region_task_px,
    )
    # region_tasks: the regions of --region-task-mpx this process ran in turn
    return _Cells(*_from_result(result, True), {"region_tasks": result.info.get("region_tasks")})


def _from_result(result, zoned: bool) -> tuple[dict, int, Iterator]:
    """``_Cells``' first fields from a ``detect_slide`` result."""
    return result.info, len(result.records), _sliced(result, zoned)


def process_slide(ref: SlideRef, settings: DetectSettings):
    """Yield the output batches of one slide (see the module doc for the keys)."""
    outcome = _new_outcome(ref)
    t0 = time.perf_counter()
    try:
        cfg = _detect_config(settings)
        slide = _open(ref, settings, cfg)
        t1 = time.perf_counter()
        outcome["stage_seconds"] = t1 - t0  # in place: opening (header and IFDs) only
        with slide:
            cells = None
            try:
                cells = _find_cells(slide, ref, settings, cfg, outcome)
                seconds = time.perf_counter() - t1
                info = cells.info
                n = cells.count
                outcome.update(
                    mpp=info.get("mpp"),
                    mpp_source=info.get("mpp_source"),
                    width=info.get("width"),
                    height=info.get("height"),
                    **cells.extra,
                    **_zone_outcome(info, n, "zones" in info),
                )
                emitted = 0
                pieces = cells.pieces
                while True:
                    # Time spent producing the pieces (crops of sampled cells, a region's crops
                    # fetched) counts as detection; time suspended in ``yield`` does not.
                    t = time.perf_counter()
                    piece = next(pieces, None)
                    seconds += time.perf_counter() - t
                    if piece is None:
                        break
                    recs, crops, zones = piece
                    thumbs = [
                        _jpeg(crops[i], settings.thumbnail_px) if settings.thumbnails else b""
                        for i in range(len(recs))
                    ]
                    emitted += len(recs)
                    yield _cell_batch(ref.slide_id, ref, crops, recs, thumbs, zones)
                if emitted != n:  # a bug, not the slide's: never commit a slide short of cells
                    raise RuntimeError(f"{emitted} cells emitted of {n} detected")
            finally:
                outcome["bytes_read"] = _total_bytes(slide.bytes_fetched, cells)
        outcome["detect_seconds"] = seconds
        outcome.update(status="ok", cell_count=n)
    except Exception as exc:  # noqa: BLE001 - any failure is this slide's outcome, not the run's
        # Cells already emitted (a failure while cropping a budget's sample or fetching a
        # region's crops) are never committed: the driver commits a failed slide without cells.
        outcome.update(status="failed", cell_count=0)
        outcome["reason"] = (
            exc.reason if isinstance(exc, _RegionFailed) else _reason(exc, None, ref.uri)
        )
        outcome["failure_class"] = failure_class(
            exc.cause if isinstance(exc, _RegionFailed) else exc
        )
        if outcome["stage_seconds"] is None:
            outcome["stage_seconds"] = time.perf_counter() - t0
        yield _slide_batch(ref, settings, outcome)
        return
    yield _slide_batch(ref, settings, outcome)


def _total_bytes(parent: int | None, cells: _Cells | None) -> int | None:
    """Bytes fetched for the slide: this task's plus its region tasks' (None: a local file)."""
    extra = cells.bytes_read() if cells is not None else None
    if parent is None and extra is None:
        return None
    return (parent or 0) + (extra or 0)


# -- region tasks ---------------------------------------------------------------------------------
class _RegionFailed(Exception):
    """A region task of the slide failed: ``cause`` (the task's exception, or a
    :class:`WorkerDiedError`) decides the failure class; ``reason`` is the slide's one line."""

    def __init__(self, cause: BaseException, reason: str):
        super().__init__(reason)
        self.cause, self.reason = cause, reason


def _region_task(
    ref_json: str,
    settings: DetectSettings,
    cfg,
    plan,
    index: int,
    mpp_source: str,
):
    """One region task (a Ray task): open the slide, detect region ``index`` of ``plan`` and
    crop and measure its chosen-zone cells. Returns ``(meta, crops)``:
    ``meta`` the cells, their zones, records (None outside the chosen zones), the nucleus-check
    count, bytes fetched, ``host:pid`` and the process's peak RSS (MiB); ``crops`` the
    ``(M, crop_px, crop_px, 3)`` uint8 crops of the records that are not None, in order."""
    import resource

    from pipeline.detect import describe_region

    _match_cpu_reservation()
    ref = ref_from_json(ref_json)
    task = plan.tasks[index]
    stats: dict = {}
    P = settings.crop_px
    slide = _open(ref, settings, cfg)
    with slide:
        try:
            part = describe_region(
                slide, task, plan, cfg, mpp_source=mpp_source, source=ref.uri, stats=stats
            )
            cells, zones, recs = part.cells, part.cell_zones, part.records
            kept = [c for c in part.crops if c is not None]
            crops = np.stack(kept) if kept else np.zeros((0, P, P, 3), np.uint8)
            del part, kept
        finally:
            fetched = slide.bytes_fetched
    meta = {
        "cells": cells,
        "cell_zones": zones,
        "records": recs,
        "no_nucleus": stats.get("no_nucleus", 0),
        "bytes_fetched": fetched,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        # ru_maxrss: KiB on Linux; the process's peak so far (a reused worker: an upper bound)
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    return meta, crops


_REMOTE = None


def _region_remote(ray):
    global _REMOTE
    if _REMOTE is None:
        _REMOTE = ray.remote(_region_task)
    return _REMOTE


def _region_error(ray, exc: BaseException, ref: SlideRef, k: int, n: int, attempts: int):
    """``exc`` from a region task as the slide's :class:`_RegionFailed` (one-line reason)."""
    where = f"region task {k + 1} of {n}"
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if isinstance(exc.cause, BaseException) else None
        if cause is None:  # not deserialisable here: the last line of the remote traceback
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            cause = RuntimeError(lines[-1] if lines else type(exc).__name__)
    elif isinstance(exc, ray.exceptions.WorkerCrashedError | ray.exceptions.OutOfMemoryError):
        cause = WorkerDiedError(
            ref.uri,
            f"worker process died on each of {attempts} attempts "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
        )
    else:
        cause = exc
    return _RegionFailed(cause, _reason(cause, None, ref.uri, where))


def _fan_out(
    ray, slide, ref: SlideRef, settings: DetectSettings, cfg, plan, mpp_source: str
) -> _Cells:
    """Run ``plan``'s region tasks as Ray tasks (at most ``region_tasks_in_flight`` at once) and
    merge them into the slide's cells (see the module doc)."""
    from pipeline.detect import DescribedRegion, merge_described

    n = len(plan.tasks)
    mpp = plan.mpp
    attempts = max(1, settings.max_slide_attempts)
    remote = _region_remote(ray).options(
        num_cpus=settings.region_task_cpus,
        num_returns=2,
        # A worker death is retried (the same cells: tasks are deterministic) up to the number
        # of attempts a slide gets; an exception of the task's own is not (it would repeat).
        max_retries=attempts - 1,
        retry_exceptions=False,
    )
    plan_ref = ray.put(plan)  # once: the zone map is the largest argument (~100 MB at 5 GP)
    ref_json = ref_to_json(ref)
    metas: list[dict | None] = [None] * n
    crop_refs: list = [None] * n
    pending: dict = {}
    todo = list(range(n))
    try:
        while todo or pending:
            while todo and len(pending) < settings.region_tasks_in_flight:
                k = todo.pop(0)
                meta_ref, crops_ref = remote.remote(
                    ref_json, settings, cfg, plan_ref, k, mpp_source
                )
                pending[meta_ref] = (k, crops_ref)
            # Blocked here, this task's CPU is lent to the cluster (Ray releases it).
            done, _ = ray.wait(list(pending), num_returns=1)
            for r in done:
                k, crops_ref = pending.pop(r)
                try:
                    metas[k] = ray.get(r)
                except Exception as exc:  # noqa: BLE001 - becomes the slide's failure
                    raise _region_error(ray, exc, ref, k, n, attempts) from None
                crop_refs[k] = crops_ref
    except BaseException:
        # The slide has failed (or this task is being torn down): the other regions are moot.
        for r in pending:
            with contextlib.suppress(Exception):  # best effort: their results are dropped anyway
                ray.cancel(r)
        raise
    finally:
        del plan_ref
    workers = sorted({m["worker"] for m in metas})
    fetched = [m["bytes_fetched"] for m in metas if m["bytes_fetched"] is not None]
    extra = {
        "region_tasks": n,
        "region_workers": workers,
        "region_peak_rss_mib": round(max(m["peak_rss_mib"] for m in metas), 1),
    }
    merged, records, where = _merge_described(plan, metas, merge_described, DescribedRegion)
    pieces = _region_pieces(ray, merged, records, where, crop_refs)
    cells = merged.cells
    info = {
        "width": slide.dimensions[0],
        "height": slide.dimensions[1],
        "mpp": mpp,
        "mpp_source": mpp_source,
        "zones": plan.zone_map.summary(),
        "zone_map_png": plan.zone_map.png(512, points=[c.centroid for c in cells]),
        "select": list(plan.select),
        "cells_outside_zones": merged.outside,
        "cells_total": merged.cells_total,
        "sampled": merged.sampled,
        "region_tasks": n,
    }
    del metas
    return _Cells(info, len(cells), pieces, extra, lambda: sum(fetched) if fetched else None)


def _merge_described(plan, metas: list[dict], merge_described, described_region):
    """:func:`pipeline.detect.merge_described` over the region tasks' records, without their
    crops (those stay in the object store): each described cell gets a zero-size placeholder
    crop and ``crop_px`` 0, and ``where`` maps each cell (by identity) to its ``(region task,
    row of that task's crops)``."""
    placeholder = np.zeros((0, 0, 3), np.uint8)
    parts = []
    where: dict[int, tuple[int, int]] = {}
    for k, m in enumerate(metas):
        row = 0
        crops: list[np.ndarray | None] = []
        for c, rec in zip(m["cells"], m["records"], strict=True):
            if rec is None:
                crops.append(None)
                continue
            where[id(c)] = (k, row)
            row += 1
            crops.append(placeholder)
        parts.append(described_region(m["cells"], m["cell_zones"], m["records"], crops))
    merged, records, _ = merge_described(plan, parts, 0)
    # merged.cells are the parts' own objects: keep them, and their ids stay valid.
    return merged, records, [where[id(c)] for c in merged.cells]


def _region_pieces(ray, merged, records: list[dict], where: list[tuple[int, int]], crop_refs):
    """The merged cells region task by region task: one task's crops fetched at a time."""
    by_task: dict[int, list[tuple[int, int]]] = {}
    for i, (k, row) in enumerate(where):
        by_task.setdefault(k, []).append((i, row))
    for k in range(len(crop_refs)):
        items = by_task.get(k)
        if not items:
            crop_refs[k] = None  # releases the task's crops in the object store
            continue
        crops = ray.get(crop_refs[k])
        crop_refs[k] = None
        for start in range(0, len(items), _PIECE):
            chunk = items[start : start + _PIECE]
            idx = [i for i, _ in chunk]
            yield (
                [records[i] for i in idx],
                np.ascontiguousarray(crops[[row for _, row in chunk]], dtype=np.uint8),
                [merged.cell_zones[i] for i in idx],
            )
        del crops


def _match_cpu_reservation() -> None:
    """OpenCV's thread pool to the task's CPU reservation. Ray caps OpenMP and BLAS pools at
    the task's CPUs (``OMP_NUM_THREADS``), but OpenCV sizes its own pool to the machine: two
    1-CPU tasks on two cores each ran 2 OpenCV threads, so slides competed for the cores."""
    import cv2

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and cv2.getNumThreads() != int(threads):
        cv2.setNumThreads(int(threads))


class AttemptLedger:
    """Counts the attempts at each slide during one run; runs as a Ray actor (created by the
    driver, handle passed to :func:`detect_batch`) so that the count survives the worker
    processes that die. State lives in this one process: it is lost with the run, as it should
    be (a later run starts counting again, and permanence across runs is the slides table's).
    """

    def __init__(self) -> None:
        self._workers: dict[str, list[str]] = {}

    def begin(self, slide_id: str, worker_id: str, max_attempts: int) -> tuple[int, str | None]:
        """Record an attempt at ``slide_id`` by worker ``worker_id`` (hex). Returns its number
        (1-based) and, once the number exceeds ``max_attempts``, what killed the previous
        attempt's worker as far as Ray knows."""
        workers = self._workers.setdefault(slide_id, [])
        workers.append(worker_id)
        if len(workers) <= max_attempts:
            return len(workers), None
        return len(workers), _death_cause(workers[-2])


def _death_cause(worker_id: str) -> str:
    """Why Ray says worker ``worker_id`` (hex) ended, in a few words; best effort: the worker
    table is Ray's internal state API, and the death may reach it late."""
    try:
        import ray
        from ray._private.state import state
        from ray.core.generated import common_pb2, gcs_pb2

        accessor = state._connect_and_get_accessor()
        info = None
        for _ in range(20):  # the raylet reports a death to the GCS shortly after the retry starts
            raw = accessor.get_worker_info(ray.WorkerID(bytes.fromhex(worker_id)))
            info = gcs_pb2.WorkerTableData.FromString(raw) if raw else None
            if info is not None and not info.is_alive:
                break
            time.sleep(0.1)
        if info is None or info.is_alive:
            return "cause unknown"
        kind = common_pb2.WorkerExitType.Name(info.exit_type)
    except Exception:  # noqa: BLE001 - an internal API; the count alone is still the answer
        return "cause unknown"
    mem = (
        f", {info.memory_used_bytes_at_death / 2**20:.0f} MiB in use"
        if info.memory_used_bytes_at_death
        else ""
    )
    if kind == "NODE_OUT_OF_MEMORY":
        return f"out of memory: killed by Ray's memory monitor{mem}"
    if kind == "SYSTEM_ERROR":
        return f"killed by a signal or crashed, e.g. SIGKILL, the kernel's OOM killer, SIGSEGV in a decoder{mem}"
    return f"exited: Ray exit type {kind}{mem}"


def _attempt_refused(ledger, ref: SlideRef, max_attempts: int) -> WorkerDiedError | None:
    """The slide's :class:`WorkerDiedError` when its earlier attempts used up ``max_attempts``."""
    if ledger is None:
        return None
    import ray

    try:
        n, cause = ray.get(
            ledger.begin.remote(
                ref.slide_id, ray.get_runtime_context().get_worker_id(), max_attempts
            ),
            timeout=120,
        )
    except Exception:  # noqa: BLE001 - the ledger is an aid; Ray's max_retries still bounds the attempts
        return None
    if n <= max_attempts:
        return None
    return WorkerDiedError(
        ref.uri, f"worker process died {n - 1} times while processing this slide (last: {cause})"
    )


def detect_batch(batch: dict[str, np.ndarray], settings: DetectSettings, ledger=None):
    """Ray Data UDF. In: ``ref`` (N,) JSON of :class:`SlideRef` (N is 1 in the plan). Out: see
    module doc. ``ledger``: handle of an :class:`AttemptLedger` actor, or None (no counting)."""
    _match_cpu_reservation()
    for text in batch["ref"]:
        ref = ref_from_json(str(text))
        died = _attempt_refused(ledger, ref, settings.max_slide_attempts)
        if died is None:
            yield from process_slide(ref, settings)
            continue
        outcome = _new_outcome(ref)
        outcome.update(reason=_reason(died, None, ref.uri), failure_class=failure_class(died))
        yield _slide_batch(ref, settings, outcome)
