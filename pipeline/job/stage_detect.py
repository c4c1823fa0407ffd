"""Per-slide CPU stage: read the slide (in place or from a local copy), detect/crop/measure.

Runs as a Ray Data task over one slide reference at a time. A single-object SVS/tiled TIFF on S3
is read in place with ranged GETs of only the tiles detection touches; anything else (local
files, multi-file slides, formats that need the whole file) is staged to the worker's local disk
and the copy removed afterwards. Slide bytes never go through the object store; what leaves the
task are the crops (the object store carries them to the caption actors) and JSON records. Any
failure (transfer after retries, unreadable slide, no scale) becomes the slide's outcome row
with ``status = "failed"`` and a one-line reason; the task itself never raises, so one bad slide
cannot fail the dataset.

Output batch keys (one row per cell, then one ``kind == "slide"`` row per slide):

``kind``       (N,) object   ``"cell"`` or ``"slide"``
``slide_id``   (N,) object   slide identity (32 hex chars)
``crop``       (N, P, P, 3) uint8   the cell crop (zeros on the slide row); P = ``crop_px``
``record``     (N,) object   JSON: a cell's DETECT columns + ids, or the slide's outcome
``thumbnail``  (N,) object   JPEG bytes of the crop (``b""`` when disabled / slide row)
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import StorageError
from pipeline.job.identity import cell_id
from pipeline.job.listing import SlidePart, SlideRef
from pipeline.job.storage import S3Settings, is_s3, split_s3, storage_for

__all__ = ["DetectSettings", "confined_path", "detect_batch", "ref_to_json", "ref_from_json", "BATCH_KEYS"]

BATCH_KEYS = ("kind", "slide_id", "crop", "record", "thumbnail")
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


def ref_to_json(ref: SlideRef) -> str:
    return json.dumps(asdict(ref))


def ref_from_json(text: str) -> SlideRef:
    d = json.loads(text)
    d["parts"] = tuple(SlidePart(**p) for p in d["parts"])
    return SlideRef(**d)


def confined_path(root: Path, rel: str) -> Path:
    """``root/rel`` with ``rel`` (an object key, untrusted) kept inside ``root``.

    Empty and ``.`` components are dropped and ``..`` is renamed, so ``a/../../etc/x`` becomes
    ``root/a/%2E%2E/%2E%2E/etc/x``; the resolved result is checked to lie under ``root``.
    Raises :class:`~pipeline.errors.StorageError` naming the key otherwise.
    """
    parts = []
    for comp in rel.replace("\\", "/").split("/"):
        comp = comp.replace("\x00", "")
        if comp in ("", "."):
            continue
        parts.append("%2E%2E" if comp == ".." else comp)
    if not parts:
        raise StorageError(f"{rel!r}: object key has no file name")
    base = root.resolve()
    out = base.joinpath(*parts).resolve()
    if out != base and base not in out.parents:
        raise StorageError(f"{rel!r}: object key escapes the scratch directory")
    return out


def _stage(ref: SlideRef, settings: DetectSettings) -> tuple[Path, Path | None, int]:
    """(path to open, scratch dir to remove or None, bytes read from storage)."""
    if not is_s3(ref.uri):
        by_rel = {p.rel: p for p in ref.parts}
        return Path(by_rel[ref.open_rel].uri), None, 0
    root = Path(settings.scratch_dir or os.path.join(tempfile.gettempdir(), "hemblip-scratch"))
    root.mkdir(parents=True, exist_ok=True)
    slide_dir = Path(tempfile.mkdtemp(prefix=f"{ref.slide_id[:12]}-", dir=root))
    storage = storage_for(ref.uri, settings.s3)
    total = 0
    try:
        for part in ref.parts:
            dest = confined_path(slide_dir, part.rel)
            total += storage.download(part.uri, dest, etag=part.etag or None)
        return confined_path(slide_dir, ref.open_rel), slide_dir, total
    except BaseException:
        shutil.rmtree(slide_dir, ignore_errors=True)
        raise


# TIFF-family suffixes the remote backend may read in place; it refuses (and the slide is
# staged) anything else inside such a file, e.g. NDPI-like or plain non-tiled TIFFs.
_REMOTE_SUFFIXES = (".svs", ".tif", ".tiff")


def _open_remote(ref: SlideRef, settings: DetectSettings):
    """(slide opened for ranged S3 reads or None, bytes the attempt fetched). None: not on S3,
    several objects, another suffix, or a format the remote backend refuses (staged instead)."""
    if not is_s3(ref.uri) or len(ref.parts) != 1 or not ref.uri.lower().endswith(_REMOTE_SUFFIXES):
        return None, 0
    from pipeline.errors import SlideOpenError
    from pipeline.slides import open_remote_slide

    part = ref.parts[0]
    bucket, key = split_s3(part.uri)
    client = storage_for(ref.uri, settings.s3).client
    try:
        slide = open_remote_slide(client, bucket, key, mpp=settings.mpp, size=part.size, etag=part.etag or None)
    except SlideOpenError as exc:
        return None, int(getattr(exc, "bytes_fetched", 0))
    return slide, 0


def _jpeg(crop: np.ndarray, side: int) -> bytes:
    from PIL import Image

    im = Image.fromarray(crop)
    if im.width != side:
        im = im.resize((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


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
    return f"{type(exc).__name__}: {text}"


def _batch(kinds, sid, crops, records, thumbs) -> dict[str, np.ndarray]:
    return {
        "kind": np.array(kinds, dtype=object),
        "slide_id": np.array([sid] * len(kinds), dtype=object),
        "crop": crops,
        "record": np.array(records, dtype=object),
        "thumbnail": np.array(thumbs, dtype=object),
    }


def process_slide(ref: SlideRef, settings: DetectSettings):
    """Yield the output batches of one slide (see the module doc for the keys)."""
    from pipeline.detect import DetectConfig, detect_slide
    from pipeline.detection import DetectorConfig

    outcome = {
        "slide_id": ref.slide_id, "slide_uri": ref.uri, "slide_etag": ref.etag,
        "slide_bytes": ref.size, "status": "failed", "reason": None, "cell_count": 0,
        "mpp": None, "mpp_source": None, "width": None, "height": None, "bytes_read": None,
        "stage_seconds": None, "detect_seconds": None,
    }
    P = settings.crop_px
    t0 = time.perf_counter()
    local: Path | None = None
    scratch: Path | None = None
    try:
        cfg = DetectConfig(crop_um=settings.crop_um, crop_px=P, mpp=settings.mpp,
                           detector=DetectorConfig(max_detect_mpp=settings.max_detect_mpp))
        remote, spent = _open_remote(ref, settings)
        if remote is None:
            local, scratch, nread = _stage(ref, settings)
        t1 = time.perf_counter()
        outcome["stage_seconds"] = t1 - t0  # remote: opening (header and IFDs) only
        if remote is None:
            outcome["bytes_read"] = spent + nread if scratch is not None else None
            result = detect_slide(local, cfg, source=ref.uri)
        else:
            try:
                with remote:
                    result = detect_slide(remote, cfg, source=ref.uri)
            finally:
                outcome["bytes_read"] = remote.bytes_fetched
        outcome["detect_seconds"] = time.perf_counter() - t1
    except Exception as exc:  # noqa: BLE001 - any failure is this slide's outcome, not the run's
        outcome["reason"] = _reason(exc, local, ref.uri)
        if outcome["stage_seconds"] is None:
            outcome["stage_seconds"] = time.perf_counter() - t0
        yield _batch(["slide"], ref.slide_id, np.zeros((1, P, P, 3), np.uint8), [_dumps(outcome)], [b""])
        return
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    info = result.info
    outcome.update(status="ok", cell_count=len(result.records), mpp=info.get("mpp"),
                   mpp_source=info.get("mpp_source"), width=info.get("width"), height=info.get("height"))
    crops = np.ascontiguousarray(result.crops, dtype=np.uint8)
    n = len(result.records)
    for start in range(0, n, _PIECE):
        stop = min(n, start + _PIECE)
        records, thumbs = [], []
        for i in range(start, stop):
            rec = dict(result.records[i])
            rec.update(cell_id=cell_id(ref.slide_id, rec["centroid_x"], rec["centroid_y"]),
                       slide_id=ref.slide_id, slide_uri=ref.uri, slide_etag=ref.etag)
            records.append(_dumps(rec))
            thumbs.append(_jpeg(crops[i], settings.thumbnail_px) if settings.thumbnails else b"")
        yield _batch(["cell"] * (stop - start), ref.slide_id, crops[start:stop], records, thumbs)
    yield _batch(["slide"], ref.slide_id, np.zeros((1, P, P, 3), np.uint8), [_dumps(outcome)], [b""])


def _match_cpu_reservation() -> None:
    """OpenCV's thread pool to the task's CPU reservation. Ray caps OpenMP and BLAS pools at
    the task's CPUs (``OMP_NUM_THREADS``), but OpenCV sizes its own pool to the machine: two
    1-CPU tasks on two cores each ran 2 OpenCV threads, so slides competed for the cores."""
    import cv2

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and cv2.getNumThreads() != int(threads):
        cv2.setNumThreads(int(threads))


def detect_batch(batch: dict[str, np.ndarray], settings: DetectSettings):
    """Ray Data UDF. In: ``ref`` (N,) JSON of :class:`SlideRef` (N is 1 in the plan). Out: see module doc."""
    _match_cpu_reservation()
    for text in batch["ref"]:
        yield from process_slide(ref_from_json(str(text)), settings)


