"""Detection evaluation against labelled smear images, and segmentation Dice.

``evaluate_detection`` runs :func:`pipeline.detection.detect_wbc` on every image of a directory,
with the image's mpp estimated from its red cells (:func:`~pipeline.detection.estimate_mpp`)
exactly as the detection stage does when a slide has no mpp, unless ``mpp`` is given. A
detection matches a ground-truth white cell when its centroid lies inside that box; matching is
one-to-one (maximum matching, ties broken by distance to the box centre). Labels are YOLO
``.txt`` (``class cx cy w h`` normalised, class 0 = WBC) or Pascal-VOC ``.xml`` (object name
``WBC``), found by image stem.

``detect_mpp`` (``--detect-mpp``) evaluates detection on a coarser copy of each image, as the
detection stage sees a slide when it reads a coarser pyramid level: the image is reduced with
``cv2.INTER_AREA`` (a scanner's level is an area-downsample of level 0) to ``detect_mpp`` µm/px,
detected there, and the detections are mapped back to the image's pixels for matching.

``python -m pipeline eval-segmentation --data DIR`` prints the nucleus and whole-cell Dice of
:func:`~pipeline.detection.segment_cell` on ``segmentation_wbc``-style crops.
"""

from __future__ import annotations

import csv
import math
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from pipeline.detection import (
    Detection,
    DetectorConfig,
    detect_wbc,
    estimate_mpp,
    reduce_to,
    segment_cell,
)
from pipeline.detection import jpeg_roundtrip as _jpeg
from pipeline.errors import ConfigError

__all__ = [
    "IMAGE_SUFFIXES",
    "match_detections",
    "read_labels",
    "read_source_map",
    "prf",
    "detect_at",
    "evaluate_detection",
    "evaluate_segmentation",
    "format_table",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_WBC_NAMES = {"wbc", "white blood cell", "leukocyte", "leucocyte"}


def match_detections(
    centroids: Sequence[tuple[float, float]], boxes: Sequence[tuple[float, float, float, float]]
) -> list[tuple[int, int]]:
    """One-to-one matches ``(detection index, box index)``: centroid inside box (inclusive).

    Maximum number of matches (Hungarian assignment); among equal counts, the one with the
    centroids closest to their boxes' centres.
    """
    if len(centroids) == 0 or len(boxes) == 0:
        return []
    c = np.asarray(centroids, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    inside = (
        (c[:, None, 0] >= b[None, :, 0])
        & (c[:, None, 0] <= b[None, :, 2])
        & (c[:, None, 1] >= b[None, :, 1])
        & (c[:, None, 1] <= b[None, :, 3])
    )
    if not inside.any():
        return []
    centre = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)
    size = np.maximum(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]), 1e-9)
    d = np.hypot(c[:, None, 0] - centre[None, :, 0], c[:, None, 1] - centre[None, :, 1]) / size
    cost = np.where(inside, np.minimum(d, 1.0), 1e6)  # <1 per match: count dominates
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(k)) for r, k in zip(rows, cols) if inside[r, k]]


def _read_yolo(path: Path, width: int, height: int) -> list[tuple[float, float, float, float]]:
    boxes = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 5:
            raise ConfigError(f"{path}: line {n}: expected 'class cx cy w h', got {line!r}")
        try:
            cls = int(float(parts[0]))
            cx, cy, w, h = (float(v) for v in parts[1:5])
        except ValueError:
            raise ConfigError(f"{path}: line {n}: not numbers: {line!r}") from None
        if cls != 0:
            continue
        boxes.append(
            (
                (cx - w / 2) * width,
                (cy - h / 2) * height,
                (cx + w / 2) * width,
                (cy + h / 2) * height,
            )
        )
    return boxes


def _read_voc(path: Path) -> list[tuple[float, float, float, float]]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ConfigError(f"{path}: not valid XML ({exc})") from None
    boxes = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip().lower()
        if name not in _WBC_NAMES:
            continue
        bb = obj.find("bndbox")
        if bb is None:
            raise ConfigError(f"{path}: a WBC object has no <bndbox>")
        try:
            boxes.append(tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: a WBC <bndbox> is incomplete") from None
    return boxes


def read_labels(
    labels_dir: Path, stem: str, width: int, height: int
) -> list[tuple[float, float, float, float]] | None:
    """WBC boxes ``(x0, y0, x1, y1)`` in px for image ``stem``; None when no label file exists."""
    txt, xml = labels_dir / f"{stem}.txt", labels_dir / f"{stem}.xml"
    if txt.is_file():
        return _read_yolo(txt, width, height)
    if xml.is_file():
        return _read_voc(xml)
    return None


def read_source_map(path: str | Path) -> dict[str, str]:
    """Image stem -> source name from a CSV with a ``source`` column and an id column
    (``uuid``, ``image``, ``filename``, ``file`` or ``name``; file names are reduced to stems)."""
    p = Path(path)
    try:
        with p.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise ConfigError(f"--source-map {p}: cannot read ({exc.strerror or exc})") from None
    if not rows:
        raise ConfigError(f"--source-map {p}: empty")
    cols = rows[0].keys()
    key = next(
        (k for k in ("uuid", "image", "filename", "file", "name", "stem") if k in cols), None
    )
    if key is None or "source" not in cols:
        raise ConfigError(
            f"--source-map {p}: needs a 'source' column and an id column (uuid/image/filename)"
        )
    return {Path(r[key]).stem: r["source"] for r in rows if r.get(key)}


def prf(tp: int, fp: int, fn: int) -> dict:
    """Counts with precision, recall and F1 (NaN where undefined)."""
    p = tp / (tp + fp) if tp + fp else math.nan
    r = tp / (tp + fn) if tp + fn else math.nan
    f = 2 * p * r / (p + r) if tp else (0.0 if (tp + fp) and (tp + fn) else math.nan)
    return {"tp": tp, "fp": fp, "fn": fn, "precision": p, "recall": r, "f1": f}


def _read_image(path: Path) -> np.ndarray:
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise ValueError("empty file")
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("not a decodable image")
    return np.ascontiguousarray(img[:, :, ::-1])


def _default_source(images_dir: Path) -> str:
    generic = {"images", "jpegimages", "train", "val", "test", "img", "imgs"}
    for part in (images_dir, *images_dir.parents):
        if part.name and part.name.lower() not in generic:
            return part.name
    return "all"


def detect_at(
    rgb: np.ndarray,
    mpp: float,
    detect_mpp: float | None,
    config: DetectorConfig | None = None,
    jpeg_quality: int | None = None,
) -> list[Detection]:
    """``detect_wbc`` on ``rgb`` ((H, W, 3) uint8 at ``mpp`` µm/px) reduced to ``detect_mpp``.

    The reduction is ``cv2.INTER_AREA`` to ``round(W * mpp / detect_mpp)`` px wide (likewise
    high), as a coarser pyramid level would hold it, and detection is told ``detect_mpp``;
    ``jpeg_quality`` (1-100) then re-encodes that image as JPEG (4:2:0), as a scanner stores
    the level. Boxes, centroids and areas come back in px of ``rgb`` (pixel centres mapped,
    boxes scaled and clipped). ``detect_mpp`` None, or not coarser than ``mpp``: ``rgb`` itself
    (JPEG re-encoded at its own resolution if ``jpeg_quality`` is given) at ``mpp``.
    """
    if detect_mpp is None or detect_mpp <= mpp:
        img = rgb if jpeg_quality is None else _jpeg(rgb, jpeg_quality)
        return detect_wbc(img, mpp, config)
    h, w = rgb.shape[:2]
    small, sx, sy = reduce_to(rgb, mpp, detect_mpp)
    if jpeg_quality is not None:
        small = _jpeg(small, jpeg_quality)
    out = []
    for d in detect_wbc(small, detect_mpp, config):
        x0, y0, x1, y1 = d.bbox
        out.append(
            Detection(
                bbox=(
                    max(int(math.floor(x0 / sx)), 0),
                    max(int(math.floor(y0 / sy)), 0),
                    min(int(math.ceil(x1 / sx)), w),
                    min(int(math.ceil(y1 / sy)), h),
                ),
                centroid=((d.centroid[0] + 0.5) / sx - 0.5, (d.centroid[1] + 0.5) / sy - 0.5),
                area_px=d.area_px / (sx * sy),
                score=d.score,
                clumped=d.clumped,
            )
        )
    return out


def evaluate_detection(
    images_dir: str | Path,
    labels_dir: str | Path,
    source_map: str | Path | dict[str, str] | None = None,
    mpp: float | None = None,
    config: DetectorConfig | None = None,
    default_source: str | None = None,
    limit: int | None = None,
    detect_mpp: float | None = None,
    jpeg_quality: int | None = None,
) -> dict:
    """Precision/recall/F1 of ``detect_wbc`` overall and per source.

    ``mpp`` None: each image's mpp is estimated from its red cells (an image where that fails
    is recorded in ``errors`` and its white cells count as missed, as the stage would fail the
    slide). ``detect_mpp`` (µm/px): detect on each image reduced to that resolution (see
    :func:`detect_at`; images already at or coarser than it are used as they are); None: on
    the image itself. ``jpeg_quality``: re-encode the image detection sees as JPEG of that
    quality (4:2:0 chroma), as a scanner's tiles are. Unreadable images and images without a label file are recorded in
    ``errors`` with a reason and left out of the counts. Returns ``{"overall", "per_source",
    "images", "errors", "n_images", "seconds", "detect_mpp"}``.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for flag, d in (("--images", images_dir), ("--labels", labels_dir)):
        if not d.is_dir():
            raise ConfigError(f"{flag} {d}: not a directory")
    if mpp is not None and (not isinstance(mpp, int | float) or not mpp > 0):
        raise ConfigError(f"--mpp: must be > 0, got {mpp!r}")
    if detect_mpp is not None and (
        isinstance(detect_mpp, bool)
        or not isinstance(detect_mpp, int | float)
        or not math.isfinite(detect_mpp)
        or not 0 < detect_mpp <= 5.0
    ):
        raise ConfigError(f"--detect-mpp: must be a number of µm/px in (0, 5], got {detect_mpp!r}")
    if jpeg_quality is not None and (
        isinstance(jpeg_quality, bool)
        or not isinstance(jpeg_quality, int)
        or not 1 <= jpeg_quality <= 100
    ):
        raise ConfigError(
            f"--detect-jpeg: must be a JPEG quality in [1, 100], got {jpeg_quality!r}"
        )
    smap = read_source_map(source_map) if isinstance(source_map, str | Path) else (source_map or {})
    fallback = default_source or _default_source(images_dir)
    paths = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit is not None:
        paths = paths[:limit]
    per_image, errors = [], []
    t0 = time.perf_counter()
    for path in paths:
        src = smap.get(path.stem, fallback)
        try:
            img = _read_image(path)
        except (OSError, ValueError) as exc:
            errors.append({"image": str(path), "source": src, "reason": f"unreadable image: {exc}"})
            continue
        h, w = img.shape[:2]
        try:
            gt = read_labels(labels_dir, path.stem, w, h)
        except (OSError, ConfigError) as exc:
            errors.append({"image": str(path), "source": src, "reason": f"bad label file: {exc}"})
            continue
        if gt is None:
            errors.append(
                {"image": str(path), "source": src, "reason": "no label file (.txt or .xml)"}
            )
            continue
        m, m_src = (float(mpp), "given") if mpp is not None else (estimate_mpp(img), "estimated")
        if m is None:
            errors.append(
                {
                    "image": str(path),
                    "source": src,
                    "reason": "mpp could not be estimated (too few red cells); its cells count as missed",
                }
            )
            dets = []
        else:
            dets = detect_at(
                img, m, None if detect_mpp is None else float(detect_mpp), config, jpeg_quality
            )
        matches = match_detections([d.centroid for d in dets], gt)
        tp = len(matches)
        per_image.append(
            {
                "image": path.name,
                "source": src,
                "mpp": m,
                "mpp_source": m_src,
                "detect_mpp": None if m is None else max(m, detect_mpp or m),
                "n_gt": len(gt),
                "n_det": len(dets),
                "tp": tp,
                "fp": len(dets) - tp,
                "fn": len(gt) - tp,
            }
        )
    seconds = time.perf_counter() - t0

    def agg(rows: list[dict]) -> dict:
        out = prf(
            sum(r["tp"] for r in rows), sum(r["fp"] for r in rows), sum(r["fn"] for r in rows)
        )
        out["n_images"] = len(rows)
        return out

    sources = sorted({r["source"] for r in per_image})
    return {
        "overall": agg(per_image),
        "per_source": {s: agg([r for r in per_image if r["source"] == s]) for s in sources},
        "images": per_image,
        "errors": errors,
        "n_images": len(paths),
        "seconds": seconds,
        "detect_mpp": detect_mpp,
        "jpeg_quality": jpeg_quality,
    }


def format_table(result: dict) -> str:
    """Plain-text table: one row per source, then overall."""
    lines = [
        f"{'source':<16}{'images':>7}{'gt':>6}{'tp':>6}{'fp':>6}{'fn':>6}{'prec':>8}{'recall':>8}{'f1':>8}"
    ]

    def row(name: str, r: dict) -> str:
        return (
            f"{name:<16}{r['n_images']:>7}{r['tp'] + r['fn']:>6}{r['tp']:>6}{r['fp']:>6}{r['fn']:>6}"
            f"{r['precision']:>8.3f}{r['recall']:>8.3f}{r['f1']:>8.3f}"
        )

    for s, r in result["per_source"].items():
        lines.append(row(s, r))
    lines.append(row("overall", result["overall"]))
    if result["errors"]:
        lines.append(f"{len(result['errors'])} image(s) with problems:")
        lines.extend(f"  {e['image']}: {e['reason']}" for e in result["errors"])
    return "\n".join(lines)


# ----------------------------------------------------------------------------- segmentation


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2.0 * (a & b).sum() / s)


SEGMENTATION_CELL_DIAMETER_UM = 12.0


def evaluate_segmentation(root: str | Path, limit: int | None = None) -> dict:
    """Nucleus and whole-cell Dice of ``segment_cell`` on ``root/dataset*/NNN.png`` crops with
    ``NNN_mask.png`` (0 background, 128 cytoplasm, 255 nucleus).

    The crops carry no scale and hold too few red cells to estimate one, so each dataset gets
    one mpp: its median annotated cell equivalent diameter taken as 12 µm (a typical white
    cell). Returns per-dataset and overall (mean of the dataset means) Dice.
    """
    root = Path(root)
    dsets = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("dataset"))
    if not dsets:
        raise ConfigError(f"{root}: no dataset*/ folders")
    out: dict = {"datasets": {}, "errors": []}
    for d in dsets:
        pairs = []
        for m in sorted(d.glob("*_mask.png")):
            img = d / m.name.replace("_mask.png", ".png")
            if img.is_file():
                pairs.append((img, m))
        if limit is not None:
            pairs = pairs[:limit]
        masks = {}
        for _, mp in pairs:
            mk = cv2.imread(str(mp), cv2.IMREAD_GRAYSCALE)
            if mk is not None:
                masks[mp] = mk
        diam = [2 * math.sqrt((mk > 64).sum() / math.pi) for mk in masks.values()]
        mpp = SEGMENTATION_CELL_DIAMETER_UM / float(np.median(diam)) if diam else 0.1
        nd, cd = [], []
        for ip, mp in pairs:
            try:
                img = _read_image(ip)
            except (OSError, ValueError) as exc:
                out["errors"].append({"image": str(ip), "reason": str(exc)})
                continue
            mk = masks.get(mp)
            if mk is None or mk.shape != img.shape[:2]:
                out["errors"].append(
                    {"image": str(ip), "reason": "mask missing or of another size"}
                )
                continue
            morph = segment_cell(img, mpp)
            nd.append(_dice(morph.nucleus_mask, mk > 192))
            cd.append(_dice(morph.cell_mask, mk > 64))
        out["datasets"][d.name] = {
            "n": len(nd),
            "mpp": mpp,
            "nucleus_dice": float(np.mean(nd)) if nd else math.nan,
            "cell_dice": float(np.mean(cd)) if cd else math.nan,
        }
    vals = list(out["datasets"].values())
    out["nucleus_dice"] = float(np.mean([v["nucleus_dice"] for v in vals]))
    out["cell_dice"] = float(np.mean([v["cell_dice"] for v in vals]))
    return out
