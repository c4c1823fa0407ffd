"""End-to-end evaluation: labelled smear fields -> pyramidal slides -> the real job -> scored rows.

``python -m pipeline eval-slides`` measures what a researcher gets from a slide, not a component:
each labelled field becomes one pyramidal slide (JPEG tiles, 2x/4x levels as consecutive TIFF
pages, the scale written as a scanner writes it), :func:`pipeline.job.run_job` processes the
slides exactly as a nightly run does (local or S3 input), and the output Parquet rows are matched
to the labels. Side by side, the same model captions the same cells given as dataset crops
(:func:`hemblip.data.build_demo_dataset`), and the gap (end-to-end minus crops) is reported.

Fields and labels (``DATA`` = the shared data folder):

* TXL-PBC images (``txl_pbc/images/{train,val}``) with YOLO WBC boxes, per source (PBC,
  Raabin-WBC, BCCD, Kaggle BCD from ``txl_pbc/source_map.csv``);
* the PBC cells of ``txl_pbc/pbc_wbcatt.csv`` (cell type + 11 WBCAtt attributes + WBC box);
* BCCD cells typed in ``bccd/wbc_types.csv`` with one WBC box in their VOC XML.

Splits (:func:`load_fields`): detection is scored only on fields the detector never trained on
(TXL-PBC ``val``, and BCCD images outside TXL-PBC); captions only on cells the caption model never
trained on (the split :func:`hemblip.data.split_samples` gives the demo dataset: WBCAtt's own for
PBC, 90/10 seeded for BCCD). A field goes to ``--split val`` or ``test`` by its caption split when
its cell is scored for captions, else by a fixed hash of its id (half and half).

Scoring (:func:`score_field`): a detection is a true positive when its centroid lies in a
labelled WBC box (one-to-one, greedy by distance to the box centre); detections whose centroid
lies outside the labelled field (in the mirror padding) are not scored; a labelled WBC whose box
lies within :data:`EDGE_UM` of the field edge (cut by it, or so near it that it and its mirror
image in the padding read as one doubled cell) is neither required nor penalised: a detection in
it is not scored and missing it is not a miss. Boxes overlapping by IoU ≥ :data:`DUPLICATE_IOU`
label one cell twice (TXL-PBC has such pairs) and count as one WBC.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, PipelineError

__all__ = [
    "SOURCES",
    "EvalSettings",
    "TypedCell",
    "Field",
    "SlideGeometry",
    "EvalDataError",
    "load_fields",
    "source_scales",
    "build_slide",
    "score_field",
    "duplicate_groups",
    "EDGE_UM",
    "DUPLICATE_IOU",
    "detection_summary",
    "typed_summary",
    "consistency_as_detector",
    "evaluate_slides",
    "format_report",
]

#: TXL-PBC's source names (``source_map.csv``) -> the names used here.
_TXL_SOURCE = {"pbc": "pbc", "raabin_wbc?": "raabin", "bcd_kaggle?": "kaggle", "bccd": "bccd"}
SOURCES: tuple[str, ...] = ("pbc", "raabin", "kaggle", "bccd")
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TILE = 256
#: Largest field decoded (px): the labelled fields are ≤ 640x480; anything much larger is not one.
_MAX_FIELD_PX = 4096 * 4096
#: How far (µm) a labelled box may lie from the field edge and still count as cut by it. The
#: padding mirrors the field, so a cell d µm from the edge meets its own image 2d µm away; within
#: 1 µm the two are closer than the detector's lobe merge (1.5 µm, ``DetectorConfig``) once a
#: label box's looseness (a few px) is counted, and read as one doubled cell centred on the seam,
#: which no real slide contains. On 308 TXL-PBC train fields (BCCD, Kaggle) 13 of 15 misses of
#: the old 2 px rule were such cells, all 1-5 px from the edge.
EDGE_UM = 1.0
#: Two labelled boxes overlapping at least this much (intersection over union) are one cell
#: labelled twice (the usual "same object" bar of box detection benchmarks). TXL-PBC has such
#: pairs (IoU 0.54-0.68 on one cell); distinct touching cells overlap far less.
DUPLICATE_IOU = 0.5
#: Fields estimated per source for its scale (from the TXL-PBC train split: no evaluated image).
_SCALE_FIELDS = 40


class EvalDataError(PipelineError, ValueError):
    """A labelled field or its label file cannot be used; the message names the file."""


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class EvalSettings:
    """One evaluation condition.

    ``split``: val | test. ``limit``: at most this many fields per source (None: all).
    ``target_mpp`` µm/px: resample every field to it before building its slide (None: keep the
    field's own scale). ``scale_error``: the slide's metadata says ``mpp × (1 + scale_error)``.
    ``jpeg_quality``: tile JPEG quality. ``slide_format``: svs | tiff | mixed (alternating).
    ``scale``: ``source`` (the median red-cell estimate of the source's fields) or ``field`` (the
    field's own red-cell estimate, the source median where it fails). ``context``: the slide's
    side is at least this many crop sides, and the padding at least one crop side each way.
    """

    split: str = "val"
    limit: int | None = None
    target_mpp: float | None = None
    scale_error: float = 0.0
    jpeg_quality: int = 90
    slide_format: str = "mixed"
    scale: str = "source"
    crop_um: float = 36.0
    context: float = 3.0

    def __post_init__(self) -> None:
        if self.split not in ("val", "test"):
            raise ConfigError(f"--split must be val or test, got {self.split!r}")
        if self.limit is not None and (
            isinstance(self.limit, bool) or int(self.limit) != self.limit or self.limit < 1
        ):
            raise ConfigError(f"--limit must be an integer >= 1, got {self.limit!r}")
        if self.target_mpp is not None and not (
            math.isfinite(self.target_mpp) and 0.02 <= self.target_mpp <= 2.0
        ):
            raise ConfigError(f"--target-mpp must be in [0.02, 2] µm/px, got {self.target_mpp!r}")
        if not (math.isfinite(self.scale_error) and -0.5 < self.scale_error < 0.5):
            raise ConfigError(f"--scale-error must be in (-0.5, 0.5), got {self.scale_error!r}")
        if (
            isinstance(self.jpeg_quality, bool)
            or int(self.jpeg_quality) != self.jpeg_quality
            or not 1 <= self.jpeg_quality <= 100
        ):
            raise ConfigError(
                f"--jpeg-quality must be an integer in [1, 100], got {self.jpeg_quality!r}"
            )
        if self.slide_format not in ("svs", "tiff", "mixed"):
            raise ConfigError(f"--format must be svs, tiff or mixed, got {self.slide_format!r}")
        if self.scale not in ("source", "field"):
            raise ConfigError(f"--scale must be source or field, got {self.scale!r}")
        if not (math.isfinite(self.crop_um) and self.crop_um > 0):
            raise ConfigError(f"crop_um must be > 0 µm, got {self.crop_um!r}")
        if not (math.isfinite(self.context) and self.context >= 1):
            raise ConfigError(f"context must be >= 1 crop side, got {self.context!r}")

    def label(self) -> str:
        """Short name of the condition, e.g. ``default`` or ``0.25 µm/px, scale +15 %, q70``."""
        parts = []
        if self.target_mpp is not None:
            parts.append(f"{self.target_mpp:g} µm/px")
        if self.scale_error:
            parts.append(f"scale {self.scale_error * 100:+.0f} %")
        if self.jpeg_quality != 90:
            parts.append(f"q{self.jpeg_quality}")
        if self.scale != "source":
            parts.append("per-field scale")
        return ", ".join(parts) or "default"


# --------------------------------------------------------------------------- fields
Box = tuple[float, float, float, float]


@dataclass
class TypedCell:
    """A labelled cell scored for captions: ``box`` (x0, y0, x1, y1) px of its field, labels as
    the caption dataset gives them (``attributes`` None = not labelled)."""

    sample_id: str
    box: Box
    cell_type: str | None
    attributes: dict[str, str | None]
    group: str  # pbc (WBCAtt attributes) | bccd (type only)


@dataclass
class Field:
    """One labelled field = one slide. ``boxes``: every labelled WBC, px of ``image``.
    ``score_detection``: the detector never trained on it. ``typed``: its cell scored for
    captions (the caption model never trained on it), or None."""

    field_id: str
    source: str
    image: Path
    boxes: list[Box]
    score_detection: bool
    typed: TypedCell | None
    split: str
    origin: str  # where it comes from and why it is in this split, for the report


def _half(key: str) -> str:
    """A fixed, even val/test assignment of an id (no model saw either half)."""
    return "val" if int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 2 == 0 else "test"


def _order(key: str) -> str:
    return hashlib.sha256(f"order:{key}".encode()).hexdigest()


def _read_csv(path: Path, need: Sequence[str]) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in need if c not in header]
            if missing:
                raise EvalDataError(f"{path}: missing column(s) {', '.join(missing)}")
            return [
                {(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader
            ]
    except FileNotFoundError:
        raise EvalDataError(f"{path}: not found") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EvalDataError(f"{path}: unreadable CSV ({exc.__class__.__name__}: {exc})") from None


def _safe_id(raw: str, where: str) -> str:
    # The id becomes a path component and a slide file name: nothing but a plain name.
    if not _SAFE_ID.fullmatch(raw or ""):
        raise EvalDataError(f"{where}: {raw[:60]!r} is not a plain image id")
    return raw


def read_yolo_wbc(label: Path, width: int, height: int) -> list[Box]:
    """WBC boxes (class 0) of a YOLO label file as (x0, y0, x1, y1) px of a ``width`` x ``height``
    image. A malformed line raises :class:`EvalDataError` naming the file and line."""
    try:
        text = label.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalDataError(f"{label}: label file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalDataError(f"{label}: unreadable ({exc.__class__.__name__})") from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls, cx, cy, w, h = parts[0], *(float(p) for p in parts[1:5])
        except ValueError:
            raise EvalDataError(f"{label}:{n}: expected 'class cx cy w h' numbers") from None
        if len(parts) != 5 or not all(math.isfinite(v) for v in (cx, cy, w, h)) or w <= 0 or h <= 0:
            raise EvalDataError(f"{label}:{n}: expected 'class cx cy w h' with w, h > 0")
        if cls == "0":
            out.append(
                (
                    (cx - w / 2) * width,
                    (cy - h / 2) * height,
                    (cx + w / 2) * width,
                    (cy + h / 2) * height,
                )
            )
    return out


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise EvalDataError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise EvalDataError(f"{path}: not a readable image ({exc.__class__.__name__})") from None


def load_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 of a field image; its size is checked from the header before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > _MAX_FIELD_PX:
                raise EvalDataError(
                    f"{path}: {im.size[0]}x{im.size[1]} px is not a microscope field"
                )
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise EvalDataError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise EvalDataError(f"{path}: cannot decode ({exc.__class__.__name__})") from None


def _centre_box(boxes: Sequence[Box], width: int, height: int) -> Box | None:
    if not boxes:
        return None
    return min(
        boxes,
        key=lambda b: ((b[0] + b[2]) / 2 - width / 2) ** 2 + ((b[1] + b[3]) / 2 - height / 2) ** 2,
    )


def load_fields(
    data_dir: str | Path,
    split: str,
    samples: Mapping[str, object],
    *,
    limit: int | None = None,
    skipped: list[str] | None = None,
) -> list[Field]:
    """The labelled fields of ``split`` (val | test), at most ``limit`` per source.

    ``samples``: ``sample_id -> CaptionSample`` of the caption model's dataset with its split set
    (:func:`hemblip.data.split_samples` over :func:`~hemblip.data.build_demo_dataset`); a cell
    is scored for captions only when its sample's split is ``split``. Which fields are used:

    * TXL-PBC ``val`` fields (the detector's training used ``train`` only): detection scored;
      ``split`` by a fixed hash of the image id, unless the field's cell is a caption sample of
      val/test (then that split);
    * TXL-PBC ``train`` fields: only PBC/BCCD fields whose cell is a caption sample of ``split``
      (captions scored, detection not: the detector trained on them);
    * BCCD images outside TXL-PBC whose cell is a caption sample of ``split``: both scored (VOC
      WBC boxes as detection labels).

    A field whose image or labels cannot be used is left out and described in ``skipped``.
    """
    from pipeline.samples import read_voc_boxes

    root = Path(data_dir)
    skipped = skipped if skipped is not None else []
    txl = root / "txl_pbc"
    rows = _read_csv(
        txl / "source_map.csv", ("uuid", "txl_split", "width", "height", "source", "original_name")
    )
    pbc_rows = {}
    pbc_csv = txl / "pbc_wbcatt.csv"
    for i, row in enumerate(
        _read_csv(pbc_csv, ("image", "img_name", "wbc_xmin", "wbc_ymin", "wbc_xmax", "wbc_ymax")), 2
    ):
        try:
            pbc_rows[_safe_id(Path(row["image"]).stem, f"{pbc_csv}:{i}")] = row
        except EvalDataError as exc:
            skipped.append(str(exc))
    bccd = root / "bccd"

    def caption_split(sample_id: str) -> str | None:
        s = samples.get(sample_id)
        return getattr(s, "split", None) if s is not None else None

    fields: list[Field] = []
    seen_bccd: set[str] = set()
    for i, row in enumerate(rows, start=2):
        where = f"{txl / 'source_map.csv'}:{i}"
        source = _TXL_SOURCE.get(row["source"])
        if source is None or row["txl_split"] not in ("train", "val", "test"):
            skipped.append(
                f"{where}: unknown source {row['source']!r} or split {row['txl_split']!r}"
            )
            continue
        try:
            uid = _safe_id(row["uuid"], where)
            image = txl / "images" / row["txl_split"] / f"{uid}.jpg"
            typed_id = None
            if source == "pbc" and uid in pbc_rows:
                typed_id = Path(pbc_rows[uid]["img_name"]).stem
            elif source == "bccd" and row["original_name"]:
                typed_id = _safe_id(Path(row["original_name"]).stem, where)
                seen_bccd.add(typed_id)
            cap = caption_split(typed_id) if typed_id else None
            # A TXL-PBC test split (held out from this project's data; a folder that has one
            # lists it in source_map.csv) is unseen by both models and all of it is --split test.
            detector_unseen = row["txl_split"] in ("val", "test")
            if cap in ("val", "test"):
                fsplit, origin = cap, f"caption-{cap} cell, TXL {row['txl_split']}"
            elif row["txl_split"] == "test":
                fsplit, origin = "test", "TXL test"
            elif detector_unseen:
                fsplit, origin = _half(uid), "TXL val (hash half)"
            else:
                continue
            if fsplit != split:
                continue
            w, h = _image_size(image)
            boxes = read_yolo_wbc(txl / "labels" / row["txl_split"] / f"{uid}.txt", w, h)
            typed = None
            if cap == split:
                s = samples[typed_id]
                if source == "pbc":
                    typed_box = _pbc_box(pbc_rows[uid], pbc_csv) or _centre_box(boxes, w, h)
                else:
                    voc = read_voc_boxes(bccd / "Annotations" / f"{typed_id}.xml")
                    typed_box = tuple(float(v) for v in voc[0]) if len(voc) == 1 else None
                if typed_box is None:
                    skipped.append(
                        f"{image}: cell {typed_id} has no single WBC box; captions not scored"
                    )
                else:
                    typed = TypedCell(
                        typed_id,
                        typed_box,
                        s.cell_type,
                        dict(s.attributes),
                        "pbc" if source == "pbc" else "bccd",
                    )
            if not detector_unseen and typed is None:
                continue
            fields.append(Field(uid, source, image, boxes, detector_unseen, typed, fsplit, origin))
        except (EvalDataError, OSError, ValueError) as exc:
            skipped.append(str(exc) if isinstance(exc, EvalDataError) else f"{where}: {exc}")
    # BCCD typed cells whose image is not in TXL-PBC: neither model's detector saw them.
    for sample_id, s in sorted(samples.items()):
        if (
            getattr(s, "source", "") != "bccd"
            or sample_id in seen_bccd
            or caption_split(sample_id) != split
        ):
            continue
        try:
            sid = _safe_id(sample_id, "caption dataset")
            image = bccd / "JPEGImages" / f"{sid}.jpg"
            voc = [
                tuple(float(v) for v in b)
                for b in read_voc_boxes(bccd / "Annotations" / f"{sid}.xml")
            ]
            _image_size(image)
            if len(voc) != 1:
                skipped.append(f"{image}: {len(voc)} WBC boxes; captions not scored")
                continue
            typed = TypedCell(sid, voc[0], s.cell_type, dict(s.attributes), "bccd")
            fields.append(
                Field(
                    sid, "bccd", image, voc, True, typed, split, f"caption-{split} cell, BCCD only"
                )
            )
        except (EvalDataError, OSError, ValueError) as exc:
            skipped.append(f"{bccd / 'Annotations' / sample_id}.xml: {exc}")
    by_source: dict[str, list[Field]] = defaultdict(list)
    for f in sorted(fields, key=lambda f: _order(f.field_id)):
        by_source[f.source].append(f)
    return [f for s in SOURCES for f in by_source[s][:limit]]


def _pbc_box(row: Mapping[str, str], where: Path) -> Box | None:
    raw = [row.get(c, "") for c in ("wbc_xmin", "wbc_ymin", "wbc_xmax", "wbc_ymax")]
    if not all(raw):
        return None
    try:
        box = tuple(float(v) for v in raw)
    except ValueError:
        raise EvalDataError(
            f"{where}: {row.get('img_name')!r}: box columns are not numbers"
        ) from None
    if not (all(math.isfinite(v) for v in box) and box[2] > box[0] and box[3] > box[1]):
        raise EvalDataError(f"{where}: {row.get('img_name')!r}: box {box} has no area")
    return box  # type: ignore[return-value]


# --------------------------------------------------------------------------- scale
def source_scales(data_dir: str | Path, n: int = _SCALE_FIELDS) -> dict[str, dict]:
    """Per source: ``{"mpp", "n", "method"}``, the median red-cell estimate
    (:func:`pipeline.detection.estimate_mpp`) over up to ``n`` TXL-PBC train fields of it (fixed
    order): a scanner writes one scale per instrument, and one field's red cells are too few for
    a steady estimate (per-field estimates of one source vary by ±40 %). No labels are used."""
    from pipeline.detection import estimate_mpp

    root = Path(data_dir) / "txl_pbc"
    rows = _read_csv(root / "source_map.csv", ("uuid", "txl_split", "source"))
    picked: dict[str, list[str]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: _order(r["uuid"])):
        src = _TXL_SOURCE.get(row["source"])
        if (
            src
            and row["txl_split"] == "train"
            and len(picked[src]) < n
            and _SAFE_ID.fullmatch(row["uuid"])
        ):
            picked[src].append(row["uuid"])
    out = {}
    for src in SOURCES:
        ests = []
        for uid in picked[src]:
            try:
                est = estimate_mpp(load_rgb(root / "images" / "train" / f"{uid}.jpg"))
            except EvalDataError:
                continue
            if est is not None:
                ests.append(est)
        if not ests:
            continue  # its fields fall back to their own estimate (evaluate_slides)
        out[src] = {
            "mpp": float(statistics.median(ests)),
            "n": len(ests),
            "method": f"median red-cell estimate over {len(ests)} TXL-PBC train fields",
        }
    return out


# --------------------------------------------------------------------------- slides
@dataclass(frozen=True)
class SlideGeometry:
    """Where a field went in its slide: field px -> slide level-0 px is ``x * fx + ox``.
    ``field_w``/``field_h``: the (resampled) field in slide px; ``mpp``: level-0 µm/px as it
    truly is; ``mpp_written``: what the metadata says; ``pad``: mirror padding (left, top,
    right, bottom) px."""

    fx: float
    fy: float
    ox: int
    oy: int
    field_w: int
    field_h: int
    width: int
    height: int
    mpp: float
    mpp_written: float
    pad: tuple[int, int, int, int]

    def to_slide(self, box: Box) -> Box:
        x0, y0, x1, y1 = box
        return (
            x0 * self.fx + self.ox,
            y0 * self.fy + self.oy,
            x1 * self.fx + self.ox,
            y1 * self.fy + self.oy,
        )

    def to_field(self, x: float, y: float) -> tuple[float, float]:
        """A slide level-0 point in resampled-field px (may lie outside ``[0, field_w)``)."""
        return x - self.ox, y - self.oy


def _resample(rgb: np.ndarray, factor: float) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    nw, nh = max(1, int(round(w * factor))), max(1, int(round(h * factor)))
    # Area averaging when reducing (as a scanner's coarser sampling integrates), cubic when enlarging.
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    return cv2.resize(rgb, (nw, nh), interpolation=interp)


def _pyramid(level0: np.ndarray, n_levels: int = 3) -> list[np.ndarray]:
    import cv2

    levels = [level0]
    for _ in range(1, n_levels):
        prev = levels[-1]
        h, w = max(1, prev.shape[0] // 2), max(1, prev.shape[1] // 2)
        levels.append(cv2.resize(prev, (w, h), interpolation=cv2.INTER_AREA))
    return levels


def write_pyramid(
    path: Path, levels: Sequence[np.ndarray], mpp: float, vendor: str, quality: int
) -> None:
    """JPEG-tiled pyramid, one TIFF page per level: Aperio SVS (``|MPP = `` in the level-0
    ImageDescription, as Aperio scanners write it) or generic TIFF (X/YResolution in
    pixels/cm, as generic pyramidal TIFF writers do). OpenSlide reads either scale."""
    import tifffile

    h0, w0 = levels[0].shape[:2]
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for i, lvl in enumerate(levels):
            h, w = lvl.shape[:2]
            ds = w0 / w
            desc = None
            if vendor == "svs":
                desc = (
                    f"Aperio Image Library v12.0.15\r\n{w0}x{h0} [0,0 {w0}x{h0}] ({_TILE}x{_TILE}) "
                    f"JPEG/RGB Q={quality}"
                )
                desc += (
                    f"|AppMag = 40|MPP = {mpp:.6f}|Filename = {path.stem}"
                    if i == 0
                    else f" -> {w}x{h} D={ds:g}"
                )
            tw.write(
                lvl,
                tile=(_TILE, _TILE),
                compression="jpeg",
                compressionargs={"level": int(quality)},
                photometric="rgb",
                resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                description=desc,
                metadata=None,
                software=False,
            )


def build_slide(
    rgb: np.ndarray, mpp: float, path: str | Path, settings: EvalSettings, vendor: str = "svs"
) -> SlideGeometry:
    """Write ``rgb`` (a field at ``mpp`` µm/px) as a pyramidal slide at ``path``.

    With ``settings.target_mpp`` the field is resampled to it first. The field is centred in
    mirror (reflect) padding, so the detector and the crops see smear, not glass, around it: at
    least one crop side (``settings.crop_um``) each way and a slide side of at least
    ``settings.context`` crop sides. The metadata scale is ``mpp × (1 + scale_error)``.
    """
    if not (math.isfinite(mpp) and mpp > 0):
        raise EvalDataError(f"{path}: field scale {mpp!r} µm/px is not usable")
    img = np.ascontiguousarray(rgb[:, :, :3])
    h, w = img.shape[:2]
    true_mpp = mpp
    if settings.target_mpp is not None:
        img = _resample(img, mpp / settings.target_mpp)
        true_mpp = settings.target_mpp
    fh, fw = img.shape[:2]
    crop_px = settings.crop_um / true_mpp
    need = settings.context * crop_px

    def pads(n: int) -> tuple[int, int]:
        total = max(2 * math.ceil(crop_px), math.ceil(need - n))
        return total // 2, total - total // 2

    (pl, pr), (pt, pb) = pads(fw), pads(fh)
    # numpy reflects repeatedly when the padding is wider than the field.
    slide = np.pad(img, ((pt, pb), (pl, pr), (0, 0)), mode="reflect")
    written = true_mpp * (1.0 + settings.scale_error)
    write_pyramid(Path(path), _pyramid(slide), written, vendor, settings.jpeg_quality)
    return SlideGeometry(
        fx=fw / w,
        fy=fh / h,
        ox=pl,
        oy=pt,
        field_w=fw,
        field_h=fh,
        width=slide.shape[1],
        height=slide.shape[0],
        mpp=true_mpp,
        mpp_written=written,
        pad=(pl, pt, pr, pb),
    )


# --------------------------------------------------------------------------- scoring
@dataclass
class FieldScore:
    """Detection outcome of one field; ``matches``: (detection index, box index) pairs (TP)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    outside: int = 0  # detections in the mirror padding (not scored)
    in_edge_cell: int = 0  # detections on a labelled WBC cut by the field edge (not scored)
    edge_boxes: int = 0  # labelled WBCs cut by the field edge (not scored)
    duplicate_boxes: int = 0  # labelled boxes that repeat another box's cell (IoU ≥ DUPLICATE_IOU)
    matches: list[tuple[int, int]] = field(default_factory=list)


#: The counts of a :class:`FieldScore`, as the report sums them.
_SCORE_COUNTS = ("tp", "fp", "fn", "outside", "in_edge_cell", "edge_boxes", "duplicate_boxes")


def _greedy(
    points: Sequence[tuple[float, float]],
    boxes: Sequence[Box],
    group: Sequence[int] | None = None,
    centres: Sequence[tuple[float, float]] | None = None,
) -> list[tuple[int, int]]:
    """One-to-one ``(point, box)`` pairs, nearest box centre first. ``group[j]``: the cell box
    ``j`` labels (default: its own); a point inside any box of a cell may take the cell, and the
    pair names the cell's first box. ``centres[j]``: the centre distances are measured to
    (default: box ``j``'s own). Equal distances are settled by the points' and cells' coordinates,
    never by their order in the input; a non-finite distance ranks last."""
    n = len(boxes)
    group = list(range(n)) if group is None else list(group)
    if centres is None:
        centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]
    if not n or not len(points):
        return []
    bx = np.asarray(boxes, dtype=float).reshape(n, 4)
    cx, cy = np.asarray(centres, dtype=float).reshape(n, 2).T
    g = np.asarray(group, dtype=np.int64)
    members: dict[int, list[int]] = defaultdict(list)
    for j, c in enumerate(group):
        members[c].append(j)
    key: dict[int, tuple] = {}  # a cell's place among equally near cells: its geometry
    pairs = []
    with np.errstate(invalid="ignore", over="ignore"):
        for i, (x, y) in enumerate(points):
            js = np.nonzero((bx[:, 0] <= x) & (x < bx[:, 2]) & (bx[:, 1] <= y) & (y < bx[:, 3]))[0]
            if not js.size:
                continue
            d = np.hypot(x - cx[js], y - cy[js])
            d[np.isnan(d)] = np.inf
            order = np.lexsort((d, g[js]))  # by cell, nearest box of the cell first
            cells, first = np.unique(g[js][order], return_index=True)
            for c, k in zip(cells.tolist(), order[first].tolist(), strict=True):
                if c not in key:
                    key[c] = min((*boxes[j], *centres[j]) for j in members[c])
                pairs.append((float(d[k]), float(x), float(y), key[c], i, c))
    used_p, used_b, out = set(), set(), []
    for *_k, i, j in sorted(pairs):
        if i not in used_p and j not in used_b:
            used_p.add(i)
            used_b.add(j)
            out.append((i, j))
    return out


def duplicate_groups(boxes: Sequence[Box], iou: float = DUPLICATE_IOU) -> list[int]:
    """``g[j]``: the first box of the cell box ``j`` labels; boxes overlapping by ≥ ``iou``
    (transitively) label one cell (intersection over union, one row of pairs at a time)."""
    n = len(boxes)
    if not n:
        return []
    b = np.asarray(boxes, dtype=float).reshape(n, 4)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    g = np.arange(n)  # each box's root: the first box of its cell so far
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for j in range(1, n):
            iw = np.minimum(b[j, 2], b[:j, 2]) - np.maximum(b[j, 0], b[:j, 0])
            ih = np.minimum(b[j, 3], b[:j, 3]) - np.maximum(b[j, 1], b[:j, 1])
            inter = iw * ih
            union = area[j] + area[:j] - inter
            ok = (iw > 0) & (ih > 0) & (union > 0)
            val = np.where(ok, inter / np.where(ok, union, 1.0), 0.0)
            roots = np.unique(g[:j][val >= iou])
            if roots.size:
                g[j] = roots[0]
                for r in roots[1:]:
                    g[g == r] = roots[0]
    return g.tolist()


def score_field(
    centroids: Sequence[tuple[float, float]],
    boxes: Sequence[Box],
    width: float,
    height: float,
    edge_px: float = 2.0,
    dedupe_iou: float | None = DUPLICATE_IOU,
) -> FieldScore:
    """Score detections (``centroids``, field px) against labelled WBC ``boxes`` (field px) of a
    ``width`` x ``height`` field; see the module docstring for the rules. ``edge_px``: a box
    this close to the edge is cut by it (:data:`EDGE_UM` at the field's scale in the job);
    ``dedupe_iou``: boxes overlapping this much are one cell (None: every box its own cell)."""
    sc = FieldScore()
    inside = [(i, p) for i, p in enumerate(centroids) if 0 <= p[0] < width and 0 <= p[1] < height]
    sc.outside = len(centroids) - len(inside)
    group = (
        duplicate_groups(boxes, dedupe_iou) if dedupe_iou is not None else list(range(len(boxes)))
    )
    cells = sorted(set(group))
    sc.duplicate_boxes = len(boxes) - len(cells)
    near = [
        b[0] <= edge_px or b[1] <= edge_px or b[2] >= width - edge_px or b[3] >= height - edge_px
        for b in boxes
    ]
    edge = dict.fromkeys(cells, False)
    for j, c in enumerate(group):
        edge[c] = edge[c] or near[j]
    sc.edge_boxes = sum(edge.values())
    # A cut cell reaches the edge it is near: the strip between its (loose) box and the edge
    # is where its doubled cell's centroid lands, on the seam with its mirror image.
    reach = [
        (
            -1.0 if b[0] <= edge_px else b[0],
            -1.0 if b[1] <= edge_px else b[1],
            width + 1.0 if b[2] >= width - edge_px else b[2],
            height + 1.0 if b[3] >= height - edge_px else b[3],
        )
        for b in boxes
    ]
    pts = [p for _i, p in inside]
    # distances to the labelled box's centre, not the reach's
    centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]
    matched = _greedy(pts, reach, group, centres)
    hit = {c for _i, c in matched}
    used = {i for i, _c in matched}
    for i, c in matched:
        if edge[c]:
            sc.in_edge_cell += 1
        else:
            sc.tp += 1
            sc.matches.append((inside[i][0], c))
    cut = np.asarray([r for r, c in zip(reach, group, strict=True) if edge[c]], dtype=float)
    cut = cut.reshape(-1, 4)
    for k, (x, y) in enumerate(pts):
        if k in used:
            continue
        if np.any((cut[:, 0] <= x) & (x < cut[:, 2]) & (cut[:, 1] <= y) & (y < cut[:, 3])):
            sc.in_edge_cell += 1  # a second piece of a cut, mirrored cell
        else:
            sc.fp += 1
    sc.fn = sum(1 for c in cells if not edge[c] and c not in hit)
    return sc


def match_typed(centroids: Sequence[tuple[float, float]], box: Box) -> int | None:
    """Index of the detection whose centroid lies in ``box`` nearest its centre, or None."""
    m = _greedy(centroids, [box])
    return m[0][0] if m else None


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def detection_summary(per_field: Iterable[tuple[str, FieldScore]]) -> dict:
    """``{source: {...}, "overall": {...}}`` with tp/fp/fn, precision, recall, fields and the
    unscored counts, from ``(source, FieldScore)`` pairs."""
    acc: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for source, sc in per_field:
        for key in (source, "overall"):
            a = acc[key]
            a["fields"] += 1
            for k in _SCORE_COUNTS:
                a[k] += getattr(sc, k)
    out = {}
    for key in [*(s for s in SOURCES if s in acc), "overall"]:
        if key not in acc:
            continue
        a = dict(acc[key])
        a["precision"] = _rate(a["tp"], a["tp"] + a["fp"])
        a["recall"] = _rate(a["tp"], a["tp"] + a["fn"])
        out[key] = a
    return out


def _wbcatt_names() -> tuple[str, ...]:
    from hemblip.ontology import HEALTHY_ATTRIBUTES

    return tuple(a.name for a in HEALTHY_ATTRIBUTES)


def typed_summary(cells: Sequence[Mapping]) -> dict:
    """Cell type and attribute figures, end to end vs dataset crops, on the matched cells.

    ``cells``: dicts with ``group`` (pbc | bccd), ``cell_type``, ``attributes`` (labels),
    ``e2e`` (``{"cell_type", "attributes"}`` from the job's row, or None when no detection
    matched the cell) and ``crop`` (the same from the dataset crop, or None).
    Per group and ``all``: n typed, n matched, cell-type metrics both ways (confusion matrices)
    and the gap; the end-to-end accuracy over all typed cells with a missed cell counted wrong.
    For PBC: balanced accuracy of each of the 11 WBCAtt attributes both ways, their means, gap.
    """
    from hemblip.metrics import attribute_metrics, cell_type_metrics

    names = _wbcatt_names()
    out: dict = {}
    groups = {
        "pbc": [c for c in cells if c["group"] == "pbc"],
        "bccd": [c for c in cells if c["group"] == "bccd"],
        "all": list(cells),
    }
    for g, cs in groups.items():
        matched = [c for c in cs if c["e2e"] is not None]
        # The crop side is captioned for every typed cell (None only with crops turned off), so
        # both sides are the same matched cells.
        cropped = [c for c in matched if c.get("crop") is not None]
        e2e = cell_type_metrics(
            [c["cell_type"] for c in matched], [c["e2e"]["cell_type"] for c in matched]
        )
        crop = cell_type_metrics(
            [c["cell_type"] for c in cropped], [c["crop"]["cell_type"] for c in cropped]
        )
        strict = cell_type_metrics(
            [c["cell_type"] for c in cs], [c["e2e"]["cell_type"] if c["e2e"] else None for c in cs]
        )
        entry = {
            "n_typed": len(cs),
            "n_matched": len(matched),
            "n_crops": len(cropped),
            "cell_type": {
                "e2e": e2e,
                "crops": crop,
                "gap": _gap(e2e["accuracy"], crop["accuracy"]),
                "e2e_all_typed_accuracy": strict["accuracy"],
            },
        }
        if g == "pbc" and matched:
            ref_attrs = [c["attributes"] for c in matched]
            a_e = attribute_metrics(ref_attrs, [c["e2e"]["attributes"] for c in matched], names)
            a_c = attribute_metrics(
                [c["attributes"] for c in cropped],
                [c["crop"]["attributes"] for c in cropped],
                names,
            )
            per = {
                n: {
                    "e2e": a_e[n]["balanced_accuracy"],
                    "crops": a_c[n]["balanced_accuracy"],
                    "gap": _gap(a_e[n]["balanced_accuracy"], a_c[n]["balanced_accuracy"]),
                    "n": a_e[n]["n_mentioned"],
                }
                for n in names
            }
            me = _mean([v["e2e"] for v in per.values()])
            mc = _mean([v["crops"] for v in per.values()])
            entry["attributes"] = {
                "per_attribute": per,
                "mean_balanced_accuracy": {"e2e": me, "crops": mc, "gap": _gap(me, mc)},
            }
        out[g] = entry
    return out


# --------------------------------------------------------------------------- consistency check
#: The morphometry columns :func:`pipeline.consistency.check_consistency` reads, carried per cell.
CHECK_MORPHOMETRY: tuple[str, ...] = (
    "cell_diameter_um",
    "nc_ratio",
    "nucleus_circularity",
    "nucleus_lobes",
)


def consistency_as_detector(cells: Sequence[Mapping]) -> dict:
    """The caption ⇄ morphometry check (:mod:`pipeline.consistency`) scored as a detector of wrong
    caption attributes, on labelled cells through the job's own crops.

    ``cells``: typed cells as :func:`typed_summary` takes them; ``e2e`` also holds the job row's
    ``consistent``, ``inconsistent_attributes`` and ``morphometry`` (the columns of
    :data:`CHECK_MORPHOMETRY`). Only matched cells with WBCAtt labels count (BCCD cells and
    unmatched cells are skipped), and per attribute only cells labelled for it.

    Per attribute the check covers (``COMPARED_ATTRIBUTES``; no other attribute is reported):
    ``n`` labelled cells, ``stated`` (the caption states a value), ``checked`` (the check could
    compare the claim with a measurement), ``flagged``, ``wrong`` (stated value ≠ label; an
    unstated value is not counted: there is no claim to flag), ``wrong_checked``,
    ``flagged_wrong``, ``precision`` = flagged_wrong / flagged, ``recall`` = flagged_wrong /
    wrong, ``recall_checked`` = flagged_wrong / wrong_checked (None when the denominator is 0).
    ``cells``: the same at cell level: a cell is *wrong* when any covered attribute is wrong, a
    *hit* when it is flagged on an attribute that is wrong; precision = hits / flagged cells,
    recall = hits / wrong cells.
    """
    from pipeline.consistency import COMPARED_ATTRIBUTES, comparable_attributes

    per = {
        a: dict.fromkeys(
            ("n", "stated", "checked", "flagged", "wrong", "wrong_checked", "flagged_wrong"), 0
        )
        for a in COMPARED_ATTRIBUTES
    }
    cell = dict.fromkeys(("n", "checked", "flagged", "wrong", "flagged_wrong"), 0)
    for c in cells:
        labels, e2e = c.get("attributes"), c.get("e2e")
        if not labels or e2e is None:
            continue
        claims = e2e.get("attributes") or {}
        labelled = [a for a in COMPARED_ATTRIBUTES if labels.get(a) is not None]
        if not labelled:
            continue
        row = {**{a: claims.get(a) for a in COMPARED_ATTRIBUTES}, **(e2e.get("morphometry") or {})}
        checked = set(comparable_attributes(row))
        flagged = set(e2e.get("inconsistent_attributes") or ())
        any_checked = any_flagged = any_wrong = hit = False
        for a in labelled:
            p = per[a]
            claim = claims.get(a)
            wrong = claim is not None and claim != labels[a]
            p["n"] += 1
            p["stated"] += claim is not None
            p["checked"] += a in checked
            p["flagged"] += a in flagged
            p["wrong"] += wrong
            p["wrong_checked"] += wrong and a in checked
            p["flagged_wrong"] += wrong and a in flagged
            any_checked |= a in checked
            any_flagged |= a in flagged
            any_wrong |= wrong
            hit |= wrong and a in flagged
        cell["n"] += 1
        cell["checked"] += any_checked
        cell["flagged"] += any_flagged
        cell["wrong"] += any_wrong
        cell["flagged_wrong"] += hit
    for p in per.values():
        p["precision"] = _rate(p["flagged_wrong"], p["flagged"])
        p["recall"] = _rate(p["flagged_wrong"], p["wrong"])
        p["recall_checked"] = _rate(p["flagged_wrong"], p["wrong_checked"])
    cell["precision"] = _rate(cell["flagged_wrong"], cell["flagged"])
    cell["recall"] = _rate(cell["flagged_wrong"], cell["wrong"])
    return {"per_attribute": per, "cells": cell}


def _gap(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _mean(vals: Sequence[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return sum(v) / len(v) if v else None


# --------------------------------------------------------------------------- the run
def _caption_samples(data_dir: Path, framing: str | None = None) -> dict[str, object]:
    from hemblip.data import build_demo_dataset, split_samples

    kw = {} if framing is None else {"framing": framing}
    try:
        dataset = build_demo_dataset(data_dir, **kw)
    except TypeError:
        raise ConfigError(
            f"--crops-framing {framing!r}: this hemblip's build_demo_dataset has no framing option"
        ) from None
    parts = split_samples(dataset)
    out = {}
    for members in parts.values():
        for s in members:
            if s.source in ("pbc_wbcatt", "bccd", "wbcatt"):
                s.source = "bccd" if s.source == "bccd" else "pbc"
                out[s.sample_id] = s
    return out


def _parse_s3_prefix(prefix: str) -> tuple[str, str]:
    if not prefix.startswith("s3://"):
        raise ConfigError(f"--s3-prefix {prefix[:80]!r}: expected s3://bucket/prefix/")
    bucket, _, key = prefix[5:].partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ConfigError(f"--s3-prefix {prefix[:80]!r}: not a valid bucket name")
    if key and not key.endswith("/"):
        key += "/"
    if any(part in ("", ".", "..") for part in key.split("/")[:-1]):
        raise ConfigError(f"--s3-prefix {prefix[:80]!r}: empty, '.' or '..' path part")
    return bucket, key


def _upload(slides: Sequence[Path], endpoint: str | None, bucket: str, key_prefix: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    from pipeline.errors import StorageError
    from pipeline.job.storage import S3Settings, s3_client

    client = s3_client(S3Settings(endpoint=endpoint))
    for p in slides:
        try:
            client.upload_file(str(p), bucket, key_prefix + p.name)
        except (BotoCoreError, ClientError, OSError) as exc:
            raise StorageError(
                f"s3://{bucket}/{key_prefix}{p.name}: upload failed "
                f"({exc.__class__.__name__}: {str(exc)[:160]})"
            ) from None


def _row_labels(row: Mapping) -> dict:
    from hemblip.ontology import ATTRIBUTE_NAMES

    return {
        "cell_type": row.get("cell_type"),
        "attributes": {n: row.get(n) for n in ATTRIBUTE_NAMES},
    }


def _finite(value) -> float | None:
    # NaN / inf (no nucleus / no cytoplasm found) are "unknown" to the check and are not JSON numbers
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | np.integer):
        return int(value)  # lobe counts stay counts
    x = float(value)
    return x if math.isfinite(x) else None


def _row_check(row: Mapping) -> dict:
    """The job's consistency verdict of a row and the morphometry it was computed from."""
    bad = row.get("inconsistent_attributes")
    return {
        "consistent": row.get("consistent"),
        "inconsistent_attributes": list(bad) if bad is not None else None,
        "morphometry": {k: _finite(row.get(k)) for k in CHECK_MORPHOMETRY},
    }


def evaluate_slides(
    data_dir: str | Path,
    settings: EvalSettings,
    *,
    model: str | None = None,
    work_dir: str | Path | None = None,
    s3_endpoint: str | None = None,
    s3_prefix: str | None = None,
    output: str | None = None,
    crops: bool = True,
    crops_framing: str | None = None,
    job_overrides: Mapping | None = None,
    say: Callable[[str], None] | None = None,
) -> dict:
    """Build the slides of ``settings.split``, run the job, score; returns the report dict.

    ``model``: the checkpoint for both the job and the crops (None: the bundled demo).
    ``work_dir``: where slides and (local) output go (None: a temporary folder, removed after).
    ``s3_prefix`` (with ``s3_endpoint`` or the AWS_ENDPOINT_URL* variables): slides are uploaded
    under ``s3_prefix/eval-slides-<id>/`` and the job reads them from S3. ``output``: the job's
    output location (default: ``work_dir/out``; may be ``s3://``). ``crops=False`` skips the
    dataset-crop side; ``crops_framing``: ``build_demo_dataset``'s ``framing`` for it (None: its
    default; "box" = the older 2.5x-box crops). ``job_overrides``: extra :class:`~pipeline.job.JobConfig` fields.
    """
    from pipeline.job import JobConfig, run_job
    from pipeline.outputs import open_outputs

    say = say or (lambda line: None)
    t0 = time.perf_counter()
    data = Path(data_dir)
    if not (data / "txl_pbc" / "source_map.csv").is_file():
        raise ConfigError(
            f"--data {str(data)[:120]!r}: not the shared data folder (no txl_pbc/source_map.csv)"
        )
    bucket = key_prefix = None
    if s3_prefix is not None:
        bucket, key_prefix = _parse_s3_prefix(s3_prefix)
    tmp = None
    if work_dir is None:
        tmp = tempfile.mkdtemp(prefix="eval-slides-")
        work = Path(tmp)
    else:
        work = Path(work_dir)
    try:
        tag = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        slide_dir = work / f"slides-{tag}"
        slide_dir.mkdir(parents=True)
        say("reading the caption dataset and its split")
        samples = _caption_samples(data, crops_framing)
        skipped: list[str] = []
        fields = load_fields(data, settings.split, samples, limit=settings.limit, skipped=skipped)
        if not fields:
            raise EvalDataError(f"{data}: no labelled fields for split {settings.split!r}")
        say(f"{len(fields)} fields; estimating each source's scale from red cells")
        scales = source_scales(data)
        geoms: dict[str, tuple[Field, SlideGeometry, dict]] = {}
        for k, f in enumerate(fields):
            try:
                rgb = load_rgb(f.image)
            except EvalDataError as exc:
                skipped.append(str(exc))
                continue
            src_scale = scales.get(f.source, {}).get("mpp")
            mpp, how, est = src_scale, "source", None
            if settings.scale == "field" or src_scale is None:
                from pipeline.detection import estimate_mpp

                est = estimate_mpp(rgb)
                if est is not None:
                    mpp, how = (
                        est,
                        "field" if settings.scale == "field" else "field (no source scale)",
                    )
                elif src_scale is not None:
                    how = "source (field estimate failed)"
                else:
                    skipped.append(
                        f"{f.image}: no scale: too few red cells, and no estimate for source {f.source}"
                    )
                    continue
            vendor = (
                settings.slide_format
                if settings.slide_format != "mixed"
                else ("svs", "tiff")[k % 2]
            )
            name = f"{f.source}_{f.field_id}.{'svs' if vendor == 'svs' else 'tiff'}"
            geom = build_slide(rgb, mpp, slide_dir / name, settings, vendor)
            geoms[name] = (f, geom, {"scale_from": how, "field_estimate": est, "field_mpp": mpp})
        say(f"{len(geoms)} slides written to {slide_dir}")
        if bucket is not None:
            key_prefix = f"{key_prefix}eval-slides-{tag}/"
            _upload([slide_dir / n for n in geoms], s3_endpoint, bucket, key_prefix)
            job_input = f"s3://{bucket}/{key_prefix}"
            say(f"uploaded to {job_input}")
        else:
            job_input = str(slide_dir)
        job_output = output or str(work / f"out-{tag}")
        kw = dict(job_overrides or {})
        kw.setdefault("reprocess", True)
        cfg = JobConfig(
            input=job_input,
            output=job_output,
            model=model,
            s3_endpoint=s3_endpoint,
            crop_um=settings.crop_um,
            **kw,
        )
        t_job = time.perf_counter()
        result = run_job(cfg, say=say)
        job_seconds = time.perf_counter() - t_job
        outs = open_outputs(job_output, s3_endpoint)
        import pyarrow.dataset as pads

        table = outs.cells.to_table(filter=pads.field("run_id") == result.run_id).to_pylist()
        slides_tab = outs.slides.to_table(filter=pads.field("run_id") == result.run_id).to_pylist()
        rows_by_slide: dict[str, list[dict]] = defaultdict(list)
        for r in table:
            rows_by_slide[str(r["slide_uri"]).rsplit("/", 1)[-1]].append(r)
        status = {str(s["slide_uri"]).rsplit("/", 1)[-1]: s for s in slides_tab}
        per_field, det_pairs, typed_cells, failures = [], [], [], []
        for name, (f, geom, scale_info) in geoms.items():
            rows = sorted(
                rows_by_slide.get(name, []), key=lambda r: (r["centroid_y"], r["centroid_x"])
            )
            st = status.get(name, {})
            if st.get("status") != "ok":
                failures.append(
                    {"slide": name, "status": st.get("status"), "reason": st.get("reason")}
                )
            pts = [geom.to_field(r["centroid_x"], r["centroid_y"]) for r in rows]
            boxes = [
                (b[0] * geom.fx, b[1] * geom.fy, b[2] * geom.fx, b[3] * geom.fy) for b in f.boxes
            ]
            sc = score_field(
                pts, boxes, geom.field_w, geom.field_h, edge_px=max(1.0, EDGE_UM / geom.mpp)
            )
            if f.score_detection:
                det_pairs.append((f.source, sc))
            rec = {
                "slide": name,
                "source": f.source,
                "field": f.field_id,
                "origin": f.origin,
                "score_detection": f.score_detection,
                "status": st.get("status"),
                "mpp_true": geom.mpp,
                "mpp_written": geom.mpp_written,
                "mpp_read": st.get("mpp"),
                "mpp_source": st.get("mpp_source"),
                **scale_info,
                "detections": len(rows),
                "labelled_wbc": len(f.boxes),
                **{k: getattr(sc, k) for k in _SCORE_COUNTS},
                # field px (resampled field), to audit or rescore the matching
                "centroids": [[round(x, 1), round(y, 1)] for x, y in pts],
                "boxes": [[round(v, 1) for v in b] for b in boxes],
                "field_px": [geom.field_w, geom.field_h],
            }
            if f.typed is not None:
                t = f.typed
                tb = (
                    t.box[0] * geom.fx,
                    t.box[1] * geom.fy,
                    t.box[2] * geom.fx,
                    t.box[3] * geom.fy,
                )
                k = match_typed(pts, tb)
                typed_cells.append(
                    {
                        "sample_id": t.sample_id,
                        "group": t.group,
                        "cell_type": t.cell_type,
                        "attributes": t.attributes,
                        "slide": name,
                        "e2e": {**_row_labels(rows[k]), **_row_check(rows[k])}
                        if k is not None
                        else None,
                        "e2e_caption": rows[k]["caption"] if k is not None else None,
                    }
                )
                rec["typed_matched"] = k is not None
            per_field.append(rec)
        if crops and typed_cells:
            from hemblip import Captioner

            say(f"captioning {len(typed_cells)} dataset crops with the same model")
            cap = Captioner(model=model, batch_size=32)
            res = cap.caption([samples[c["sample_id"]].image for c in typed_cells])
            for c, r in zip(typed_cells, res):
                c["crop"] = {"cell_type": r.cell_type, "attributes": dict(r.attributes)}
                c["crop_caption"] = r.caption
        else:
            for c in typed_cells:
                c["crop"] = None
        return {
            "date": f"{datetime.now(UTC):%Y-%m-%d}",
            "condition": settings.label(),
            "crops_framing": crops_framing or "build_demo_dataset default",
            "settings": asdict(settings),
            "data": str(data),
            "model": {"id": result.model_id, "version": result.model_version},
            "job": {
                "run_id": result.run_id,
                "status": result.status,
                "input": job_input,
                "output": job_output,
                "slides_ok": result.ok,
                "slides_failed": result.failed,
                "seconds": job_seconds,
            },
            "scales": scales,
            "fields": {s: sum(1 for f, _g, _i in geoms.values() if f.source == s) for s in SOURCES},
            "detection": detection_summary(det_pairs),
            "typed": typed_summary(typed_cells),
            "consistency": consistency_as_detector(typed_cells),
            "failures": failures,
            "skipped": skipped,
            "per_field": per_field,
            "typed_cells": [
                {
                    **{k: v for k, v in c.items() if k != "attributes"},
                    "labels_checked": _checked_labels(c["attributes"]),
                }
                for c in typed_cells
            ],
            "seconds": time.perf_counter() - t0,
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _checked_labels(labels: Mapping | None) -> dict | None:
    """The labels of the attributes the consistency check covers (to audit its verdicts)."""
    from pipeline.consistency import COMPARED_ATTRIBUTES

    return None if labels is None else {a: labels.get(a) for a in COMPARED_ATTRIBUTES}


# --------------------------------------------------------------------------- text
def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _sf(v) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def format_report(rep: Mapping) -> str:
    """The report as plain-text tables (detection, cell type + confusion, attributes)."""
    lines = [
        f"eval-slides {rep['date']}  split={rep['settings']['split']}  condition: {rep['condition']}  "
        f"model {rep['model']['id']} ({rep['model']['version']})  crops: {rep.get('crops_framing')}",
        "scale per source: "
        + ", ".join(f"{s} {v['mpp']:.4f} µm/px (n={v['n']})" for s, v in rep["scales"].items()),
        "",
        "Detection (fields the detector never trained on; padding and edge-cut cells not scored)",
        f"{'source':<9}{'fields':>7}{'TP':>6}{'FP':>6}{'FN':>6}{'precision':>11}{'recall':>8}"
        f"{'edge-cut':>10}{'dup. boxes':>12}",
    ]
    for src, d in rep["detection"].items():
        lines.append(
            f"{src:<9}{d['fields']:>7}{d['tp']:>6}{d['fp']:>6}{d['fn']:>6}"
            f"{_f(d['precision']):>11}{_f(d['recall']):>8}"
            f"{d.get('edge_boxes', 0):>10}{d.get('duplicate_boxes', 0):>12}"
        )
    lines += [
        "",
        "Cell type on matched cells: end to end (job rows) vs the same cells as dataset crops",
        f"{'group':<6}{'typed':>7}{'matched':>9}{'e2e acc':>9}{'crops acc':>11}{'gap':>8}{'e2e acc, missed=wrong':>23}",
    ]
    for g, t in rep["typed"].items():
        ct = t["cell_type"]
        lines.append(
            f"{g:<6}{t['n_typed']:>7}{t['n_matched']:>9}{_f(ct['e2e']['accuracy']):>9}"
            f"{_f(ct['crops']['accuracy']):>11}{_sf(ct['gap']):>8}{_f(ct['e2e_all_typed_accuracy']):>23}"
        )
    allc = rep["typed"].get("all", {}).get("cell_type")
    for way in ("e2e", "crops"):
        conf = allc[way]["confusion"] if allc else None
        if conf and conf["labels"]:
            lines += [
                "",
                f"Confusion ({way}; rows reference, columns prediction; all typed groups)",
                " " * 12 + "".join(f"{c[:5]:>7}" for c in conf["columns"]),
            ]
            lines += [
                f"{lab[:11]:<12}" + "".join(f"{v:>7}" for v in row)
                for lab, row in zip(conf["labels"], conf["matrix"])
            ]
    attrs = rep["typed"].get("pbc", {}).get("attributes")
    if attrs:
        lines += [
            "",
            "WBCAtt attributes, PBC matched cells: balanced accuracy",
            f"{'attribute':<27}{'e2e':>7}{'crops':>7}{'gap':>8}{'n':>5}",
        ]
        for n, v in attrs["per_attribute"].items():
            lines.append(
                f"{n:<27}{_f(v['e2e']):>7}{_f(v['crops']):>7}{_sf(v['gap']):>8}{v['n']:>5}"
            )
        m = attrs["mean_balanced_accuracy"]
        lines.append(f"{'mean of 11':<27}{_f(m['e2e']):>7}{_f(m['crops']):>7}{_sf(m['gap']):>8}")
    lines += format_consistency(rep.get("consistency"))
    if rep["failures"]:
        lines += ["", f"{len(rep['failures'])} slide(s) not ok:"] + [
            f"  {x['slide']}: {x['status']} {x['reason'] or ''}" for x in rep["failures"][:20]
        ]
    if rep["skipped"]:
        lines += ["", f"{len(rep['skipped'])} item(s) left out:"] + [
            f"  {s}" for s in rep["skipped"][:20]
        ]
    lines += ["", f"job {rep['job']['seconds']:.0f} s, total {rep['seconds']:.0f} s"]
    return "\n".join(lines)


def format_consistency(cons: Mapping | None) -> list[str]:
    """The consistency check as a detector of wrong caption attributes: text table lines."""
    if not cons or not cons["cells"]["n"]:
        return []
    lines = [
        "",
        "Caption ⇄ morphometry check as a detector of wrong attributes (PBC matched cells, "
        "wrong = stated caption value ≠ WBCAtt label)",
        f"{'attribute':<27}{'n':>5}{'checked':>9}{'flagged':>9}{'wrong':>7}{'flagged&wrong':>15}"
        f"{'precision':>11}{'recall':>8}{'recall (checked)':>18}",
    ]
    for a, p in cons["per_attribute"].items():
        lines.append(
            f"{a:<27}{p['n']:>5}{p['checked']:>9}{p['flagged']:>9}{p['wrong']:>7}{p['flagged_wrong']:>15}"
            f"{_f(p['precision']):>11}{_f(p['recall']):>8}{_f(p['recall_checked']):>18}"
        )
    c = cons["cells"]
    lines.append(
        f"{'cells (any covered attr.)':<27}{c['n']:>5}{c['checked']:>9}{c['flagged']:>9}{c['wrong']:>7}"
        f"{c['flagged_wrong']:>15}{_f(c['precision']):>11}{_f(c['recall']):>8}"
    )
    return lines


def write_json(rep: Mapping, path: str | Path) -> None:
    """Write the report as JSON (numbers as numbers, nothing dropped)."""
    Path(path).write_text(json.dumps(rep, indent=1, default=float) + "\n", encoding="utf-8")
