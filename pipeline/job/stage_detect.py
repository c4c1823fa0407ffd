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
the cells counted outside the chosen zones, ``cells_total``/``sampled`` of the per-slide budget
(``max_cells``, a spatially uniform sample seeded by the slide id, so a re-executed task picks the
same cells) and the zone-map PNG.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import time
from dataclasses import asdict, dataclass
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
    max_slide_attempts: int = 3  # worker deaths on one slide before it is recorded worker_died
    max_decode_mb: float = 1024.0  # decode budget of one read / whole-image decode, MiB
    zones: tuple[str, ...] = ()  # smear zones to describe; () = whole slide, no zone map
    max_cells: int | None = None  # per-slide cell budget (spatially uniform sample); None = all


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


def _reason(exc: BaseException, local: Path | None, uri: str) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if local is not None:
        text = text.replace(str(local), uri)
    if not text.startswith(uri):
        text = f"{uri}: {text}"
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
        "zone_map_png": None,
    }


def _zone_outcome(info: dict, n_cells: int, zoned: bool) -> dict:
    """The outcome's zone and budget keys from ``detect_slide``'s ``info`` (see the module doc)."""
    total = info.get("cells_total")
    total = n_cells if total is None else int(total)
    out = {"cells_total": total, "sampled": bool(info.get("sampled", total > n_cells))}
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


def process_slide(ref: SlideRef, settings: DetectSettings):
    """Yield the output batches of one slide (see the module doc for the keys)."""
    from pipeline.detect import DetectConfig, detect_slide
    from pipeline.detection import DetectorConfig

    outcome = _new_outcome(ref)
    P = settings.crop_px
    t0 = time.perf_counter()
    try:
        cfg = DetectConfig(
            crop_um=settings.crop_um,
            crop_px=P,
            mpp=settings.mpp,
            max_decode_mb=settings.max_decode_mb,
            detector=DetectorConfig(max_detect_mpp=settings.max_detect_mpp),
        )
        # The factory reads a single-object SVS/tiled TIFF on S3 in place and stages anything
        # else to scratch (removed when the slide is closed, or when opening fails).
        slide = open_slide(
            ref.uri,
            mpp=settings.mpp,
            max_pixels=cfg.max_pixels,
            max_decode_mb=settings.max_decode_mb,
            storage_options=settings.s3,
            scratch_dir=settings.scratch_dir,
            parts=ref.parts,
            open_rel=ref.open_rel,
        )
        t1 = time.perf_counter()
        outcome["stage_seconds"] = t1 - t0  # in place: opening (header and IFDs) only
        with slide:
            try:
                if settings.zones:
                    result = detect_slide(
                        slide,
                        cfg,
                        source=ref.uri,
                        zones=True,
                        select=tuple(settings.zones),
                        max_cells=settings.max_cells,
                        seed=_seed(ref.slide_id),
                    )
                else:
                    result = detect_slide(
                        slide,
                        cfg,
                        source=ref.uri,
                        max_cells=settings.max_cells,
                        seed=_seed(ref.slide_id),
                    )
            finally:
                outcome["bytes_read"] = slide.bytes_fetched  # None for a local file
        outcome["detect_seconds"] = time.perf_counter() - t1
    except Exception as exc:  # noqa: BLE001 - any failure is this slide's outcome, not the run's
        outcome["reason"] = _reason(exc, None, ref.uri)
        outcome["failure_class"] = failure_class(exc)
        if outcome["stage_seconds"] is None:
            outcome["stage_seconds"] = time.perf_counter() - t0
        yield _slide_batch(ref, settings, outcome)
        return
    info = result.info
    outcome.update(
        status="ok",
        cell_count=len(result.records),
        mpp=info.get("mpp"),
        mpp_source=info.get("mpp_source"),
        width=info.get("width"),
        height=info.get("height"),
        **_zone_outcome(info, len(result.records), bool(settings.zones)),
    )
    crops = np.ascontiguousarray(result.crops, dtype=np.uint8)
    n = len(result.records)
    zones = result.cell_zones if settings.zones else None
    for start in range(0, n, _PIECE):
        stop = min(n, start + _PIECE)
        thumbs = [
            _jpeg(crops[i], settings.thumbnail_px) if settings.thumbnails else b""
            for i in range(start, stop)
        ]
        yield _cell_batch(
            ref.slide_id,
            ref,
            crops[start:stop],
            result.records[start:stop],
            thumbs,
            None if zones is None else zones[start:stop],
        )
    yield _slide_batch(ref, settings, outcome)


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
