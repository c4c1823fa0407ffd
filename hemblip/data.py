"""Caption datasets: readers for WBCAtt, LeukemiaAttri and a generic CSV, and the demo dataset.

Every reader returns a :class:`SampleList` (a ``list`` of :class:`CaptionSample`, plus
``.skipped``: the items left out and why). A cell is cut out of its image exactly as the job cuts
it out of a slide (train/serve parity): :func:`hemblip.crops.cell_crop`, a ``crop_um`` (36) µm
square around the cell's centre at the image's own scale, resampled to ``crop_px`` (224) px with
the job's interpolation; what lies past the image border is the image mirrored (a field is cut
out of a smear, so smear surrounds it, not glass). The image's scale (µm/px) is, as in the job,
its TIFF resolution tags when present, else the ``mpp`` given (argument, ``mpp`` column, or a
dataset's documented scale), else the red-cell estimate of the image
(:func:`hemblip.scale.estimate_image_mpp`); each sample records it (``mpp``, ``mpp_source``).
``framing="box"`` keeps the old crop of ``scale`` x the cell box (every cell filling the same
share of its crop: a size cue the job never shows) for comparisons only.

A bad row raises :class:`~hemblip.errors.DatasetError` naming the file and row, unless
``skip_missing=True`` where missing/unreadable images (and images without a usable scale) are
recorded in ``.skipped``.
"""

from __future__ import annotations

import csv
import json
import math
import random
import warnings
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hemblip._paths import dataset_path
from hemblip.captions import parse_caption, render_caption
from hemblip.crops import CROP_PX, CROP_UM, PADS, cell_crop
from hemblip.errors import DatasetError, HemblipConfigError
from hemblip.ontology import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    CASE_NAMES,
    HEALTHY_ATTRIBUTES,
    LEUKEMIA_ATTRI_FIELDS,
    cell_type_from_label,
)

__all__ = [
    "CaptionSample",
    "SampleList",
    "Skipped",
    "crop_around_box",
    "read_wbcatt",
    "read_leukemia_attri",
    "read_generic_csv",
    "write_generic_csv",
    "load_dataset",
    "build_demo_dataset",
    "split_samples",
    "SPLITS",
    "FRAMINGS",
    "SEGMENTATION_WBC_MPP",
    "PBC_MPP",
    "BCCD_MPP",
]

SPLITS = ("train", "val", "test")
_HEALTHY_NAMES = tuple(a.name for a in HEALTHY_ATTRIBUTES)
_BOX_COLUMNS = ("x0", "y0", "x1", "y1")
#: "physical": the job's crop (default); "box": ``scale`` x the cell's box (comparisons only).
FRAMINGS = ("physical", "box")
#: µm/px of the segmentation_WBC crops, measured once over the whole dataset (their red-cell
#: estimates per crop are unusable: dataset1's 120-px crops hold one or two red cells, and a few
#: of dataset2's are off by 4x). dataset2 (300 px, CellaVision): the median of the red-cell
#: estimates of its 100 crops (0.115; IQR 0.105-0.137). dataset1 (120 px): too few red cells
#: for any estimate (median 0.69, IQR 0.42-1.21: noise); its white cells' mask diameters, class
#: by class, are 2.09-2.48x smaller in px than dataset2's (neutrophils 76.5 vs 160.1 px,
#: lymphocytes 58.2 vs 140.2), so 0.115 x ~2.2 = 0.25.
SEGMENTATION_WBC_MPP = {"dataset1": 0.25, "dataset2": 0.115}
#: µm/px of the PBC images (one instrument, CellaVision DM96, one magnification: one scale, as a
#: scanner writes one per instrument). The median red-cell estimate over 40 TXL-PBC train fields
#: of the PBC source (``pipeline.eval_slides.source_scales``; the PBC images' own per-image
#: estimates have median 0.111 but vary ±40 %, which would teach the model a size cue the job
#: never shows: the job reads one scale per slide). WBCAtt's cells are all PBC images.
PBC_MPP = 0.109
#: µm/px of the BCCD images, measured the same way over 40 TXL-PBC train fields of the BCCD source.
BCCD_MPP = 0.085
_MPP_RANGE = (0.01, 50.0)  # µm/px a microscope image can plausibly have (as the job's readers)


@dataclass
class CaptionSample:
    """One training/evaluation cell.

    ``image``: (H, W, 3) uint8 RGB, already cropped around the cell. ``attributes`` holds every
    name of :data:`~hemblip.ontology.ATTRIBUTE_NAMES` (None = unknown/not mentioned). ``split``
    is the dataset's own split (train/val/test) or None when it has none. ``mpp``: µm/px of the
    image the crop was cut from, ``mpp_source`` where that came from: "metadata" (TIFF
    resolution), "given" (argument or CSV column), "dataset" (a dataset's documented scale),
    "estimated" (red cells); None when the image was taken as given (already a crop) or cut
    with ``framing="box"``.
    """

    image: np.ndarray
    caption: str
    cell_type: str | None
    case: str | None
    attributes: dict[str, str | None]
    sample_id: str
    source: str
    split: str | None = None
    mpp: float | None = None
    mpp_source: str | None = None

    def __post_init__(self) -> None:
        if self.split is not None and self.split not in SPLITS:
            raise DatasetError(f"sample {self.sample_id}: split must be one of {SPLITS}, got {self.split!r}")
        self.attributes = {n: self.attributes.get(n) for n in ATTRIBUTE_NAMES}


@dataclass(frozen=True)
class Skipped:
    """An item a reader left out: ``item`` names the file/row, ``reason`` says why."""

    item: str
    reason: str


class SampleList(list):
    """A ``list[CaptionSample]`` that also carries ``skipped: list[Skipped]``."""

    def __init__(self, items: Iterable[CaptionSample] = (), skipped: Iterable[Skipped] = ()):
        super().__init__(items)
        self.skipped: list[Skipped] = list(skipped)


# --------------------------------------------------------------------------- images
def crop_around_box(image: np.ndarray, box: Sequence[float], scale: float = 2.5) -> np.ndarray:
    """Square crop centred on ``box`` = (x0, y0, x1, y1) px, side = ``scale`` × max(box w, h).

    Parts past the image border are white (255). Returns (side, side, 3) uint8.
    """
    if scale <= 0:
        raise ValueError(f"crop scale must be > 0, got {scale}")
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    if not (w > 0 and h > 0):
        raise ValueError(f"box {tuple(box)} has no area")
    side = max(1, int(round(scale * max(w, h))))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    img = _as_rgb(image)
    out = np.full((side, side, 3), 255, dtype=np.uint8)
    H, W = img.shape[:2]
    sx0, sy0 = max(left, 0), max(top, 0)
    sx1, sy1 = min(left + side, W), min(top + side, H)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = img[sy0:sy1, sx0:sx1]
    return out


def _pad_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    return crop_around_box(image, (0, 0, w, h), scale=1.0)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    return np.ascontiguousarray(arr[:, :, :3].astype(np.uint8, copy=False))


def _load_image(path: Path) -> np.ndarray:
    """RGB uint8 array; raises DatasetError (one line, naming the file) when unusable."""
    return _load_image_mpp(path)[0]


def _load_image_mpp(path: Path) -> tuple[np.ndarray, float | None]:
    """``(RGB uint8 array, µm/px from its TIFF resolution tags or None)``; raises DatasetError
    (one line, naming the file) when unusable."""
    from PIL import Image, UnidentifiedImageError

    from hemblip.scale import tiff_resolution_mpp

    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")), tiff_resolution_mpp(im)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot decode image ({exc.__class__.__name__}: {exc})") from None


def _resize(image: np.ndarray, crop_px: int | None) -> np.ndarray:
    if crop_px is None or image.shape[:2] == (crop_px, crop_px):
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((crop_px, crop_px), Image.Resampling.BICUBIC))


@dataclass(frozen=True)
class _Framing:
    """How a reader cuts its crops (validated once, up front)."""

    framing: str = "physical"
    crop_um: float = CROP_UM
    crop_px: int | None = None
    pad: str = "reflect"
    scale: float = 2.5
    mpp: float | None = None

    def __post_init__(self) -> None:
        if self.framing not in FRAMINGS:
            raise HemblipConfigError(f"framing must be one of {', '.join(FRAMINGS)}, got {self.framing!r}")
        if self.pad not in PADS:
            raise HemblipConfigError(f"pad must be one of {', '.join(PADS)}, got {self.pad!r}")
        if self.mpp is not None and _check_mpp(self.mpp) is None:
            raise HemblipConfigError(f"mpp must be a scale in µm/px within [{_MPP_RANGE[0]:g}, "
                                     f"{_MPP_RANGE[1]:g}], got {self.mpp!r}")
        if self.crop_px is not None and not (isinstance(self.crop_px, int) and 16 <= self.crop_px <= 4096):
            raise HemblipConfigError(f"crop_px must be an integer in [16, 4096], got {self.crop_px!r}")
        if not (isinstance(self.crop_um, int | float) and math.isfinite(self.crop_um) and 0 < self.crop_um <= 500):
            raise HemblipConfigError(f"crop_um must be a number of µm in (0, 500], got {self.crop_um!r}")

    @property
    def physical(self) -> bool:
        return self.framing == "physical"


def _check_mpp(value: object) -> float | None:
    """``value`` as a plausible µm/px float, else None."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and _MPP_RANGE[0] <= v <= _MPP_RANGE[1] else None


class _Scales:
    """Each image's scale, settled once per image (the red-cell estimate costs ~50 ms)."""

    def __init__(self) -> None:
        self._cache: dict[object, tuple[float, str]] = {}

    def get(self, key: object, image: np.ndarray, meta: float | None, given: float | None,
            given_source: str, where: str) -> tuple[float, str]:
        """``(mpp, source)`` as the job settles it: metadata, else given, else the red-cell
        estimate; DatasetError naming ``where`` when there is none."""
        if meta is not None:
            return meta, "metadata"
        if given is not None:
            return given, given_source
        if key not in self._cache:
            from hemblip.scale import estimate_image_mpp

            h, w = image.shape[:2]
            est = estimate_image_mpp(lambda b: image[b[1]:b[3], b[0]:b[2]], w, h) if min(h, w) >= 2 else None
            if est is None or _check_mpp(est) is None:
                raise DatasetError(f"{where}: no scale for the image: no TIFF resolution tags, no mpp given, "
                                   "and too few red cells to estimate it; pass mpp= (or an 'mpp' column)")
            self._cache[key] = (float(est), "estimated")
        return self._cache[key]


def _box_center(box: Sequence[float]) -> tuple[float, float]:
    return (float(box[0]) + float(box[2])) / 2, (float(box[1]) + float(box[3])) / 2


def _finish(image: np.ndarray, box: Sequence[float] | None, fr: _Framing, *, scale: tuple[float, str] | None = None,
            center: tuple[float, float] | None = None) -> tuple[np.ndarray, float | None, str | None]:
    """``(crop, mpp, mpp_source)`` of the cell at ``center`` (default: the box's centre; neither:
    the image is already a crop, padded to a square as given)."""
    img = _as_rgb(image)
    if fr.physical and scale is not None and (center is not None or box is not None):
        c = center if center is not None else _box_center(box)  # type: ignore[arg-type]
        crop = cell_crop(img, c, scale[0], crop_um=fr.crop_um, crop_px=fr.crop_px or CROP_PX, pad=fr.pad)
        return crop, scale[0], scale[1]
    if not fr.physical and box is not None:
        return _resize(crop_around_box(img, box, fr.scale), fr.crop_px), None, None
    return _resize(_pad_square(img), fr.crop_px), None, None


# --------------------------------------------------------------------------- value helpers
def _norm_attr(name: str, raw: object, where: str) -> str | None:
    """Dataset cell value -> ontology value (None for blank/NA); DatasetError when unknown."""
    if raw is None:
        return None
    text = " ".join(str(raw).strip().lower().replace("_", " ").split())
    if text in ("", "na", "n/a", "nan", "none", "unknown", "null"):
        return None
    values = ATTRIBUTES[name].values
    aliases = {"scant": "scanty", "purple-blue": "purple blue", "light-blue": "light blue",
               "dense": "densely", "loose": "loosely", "big": "big", "absent": "absent"}
    text = aliases.get(text, text)
    if name == "leukemic_cell_size" and text == "big":
        text = "large"
    if name == "cell_size" and text == "large":
        text = "big"
    for v in values:
        if text == v or text.replace(" ", "-") == v or text.replace("-", " ") == v:
            return v
    raise DatasetError(f"{where}: attribute {name}: unknown value {raw!r}; expected one of {'|'.join(values)}")


def _norm_case(raw: object, where: str) -> str | None:
    if raw is None:
        return None
    text = " ".join(str(raw).strip().replace("_", " ").split())
    if text.lower() in ("", "na", "none", "unknown", "null"):
        return None
    for code, name in CASE_NAMES.items():
        if text.upper() == code.upper() or text.lower() in (name, name.replace("leukemia", "leukaemia")):
            return code
    if text.lower() in ("normal", "healthy control", "control", "healthy donor"):
        return "healthy"
    raise DatasetError(f"{where}: unknown case {raw!r}; expected one of {', '.join(CASE_NAMES)} or its full name")


def _norm_cell_type(raw: object, where: str) -> str | None:
    if raw is None or not str(raw).strip():
        return None
    try:
        return cell_type_from_label(str(raw))
    except ValueError as exc:
        raise DatasetError(f"{where}: {exc}") from None


def _open_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = [h.strip() for h in (reader.fieldnames or [])]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a readable CSV ({exc})") from None
    rows = [{(k or "").strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items()}
            for r in rows]
    return header, rows


def _skip_or_raise(err: DatasetError, item: str, skip_missing: bool, skipped: list[Skipped]) -> None:
    if not skip_missing:
        raise err
    skipped.append(Skipped(item, str(err)))


def _warn_skipped(path: Path, skipped: list[Skipped]) -> None:
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} item(s); first: {skipped[0].item}: "
                      f"{skipped[0].reason}", stacklevel=3)


# --------------------------------------------------------------------------- WBCAtt
def _txl_label_box(image_path: Path, width: int, height: int) -> tuple[float, ...] | None:
    """TXL-PBC YOLO labels beside images/<split>/<uuid>.jpg: the WBC box nearest the centre."""
    label = image_path.parent.parent.parent / "labels" / image_path.parent.name / (image_path.stem + ".txt")
    if not label.is_file():
        return None
    best, best_d = None, None
    for line in label.read_text().splitlines():
        parts = line.split()
        if len(parts) != 5 or parts[0] != "0":
            continue
        cx, cy, w, h = (float(p) for p in parts[1:])
        d = (cx - 0.5) ** 2 + (cy - 0.5) ** 2
        if best_d is None or d < best_d:
            best_d = d
            best = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
    return best


def _wbcatt_image(row: dict[str, str], root: Path) -> Path:
    candidates: list[Path] = []
    # Every name in the row is checked, not only the one that exists: a row naming a path
    # outside the image root is refused as a whole.
    if row.get("image"):
        first = dataset_path(root, row["image"])
        parts = row["image"].split("/")
        candidates += [first, dataset_path(root, "/".join(parts[1:]))] if len(parts) > 1 else [first]
    if row.get("path"):
        candidates.append(dataset_path(root, row["path"]))
    if row.get("img_name"):
        candidates.append(dataset_path(root, row["img_name"]))
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0] if candidates else root


def read_wbcatt(csv_path: str | Path, image_root: str | Path, *, skip_missing: bool = False,
                crop_px: int | None = None, scale: float = 2.5, mpp: float | None = None,
                framing: str = "physical", crop_um: float = CROP_UM, pad: str = "reflect") -> SampleList:
    """Read a WBCAtt attribute CSV (healthy PBC cells, case ``"healthy"``).

    Columns: ``img_name, label, <11 WBCAtt attributes>, path`` (WBCAtt's own files), or the
    TXL-PBC join ``image, img_name, wbcatt_split, label, <11 attributes>, wbc_xmin..wbc_ymax``.
    The image is found at ``image_root/image`` (also without its first path part),
    ``image_root/path`` or ``image_root/img_name``. The crop is the job's (module docstring)
    around the WBC box's centre (px); without a box in the row, the TXL YOLO WBC box beside the
    image nearest its centre, else the image centre (PBC images are cell-centred). ``mpp``: µm/px
    of images without TIFF resolution tags (default: :data:`PBC_MPP`, WBCAtt's images being PBC's;
    ``mpp_source`` "dataset"). ``split``
    comes from ``wbcatt_split`` or from the file name (``..._train.csv``). ``crop_px``: crop side
    (default 224; with ``framing="box"``, default the box crop's own size).
    """
    path = Path(csv_path)
    root = Path(image_root)
    header, rows = _open_csv(path)
    missing = [c for c in ("label", *_HEALTHY_NAMES) if c not in header]
    if missing or not ({"img_name", "image", "path"} & set(header)):
        raise DatasetError(f"{path}: not a WBCAtt CSV: missing column(s) "
                           f"{', '.join(missing) or 'img_name/image/path'}")
    file_split = next((s for s in SPLITS if path.stem.lower().endswith(s)), None)
    fr = _Framing(framing, crop_um, crop_px, pad, scale, PBC_MPP if mpp is None else mpp)
    given_src = "dataset" if mpp is None else "given"
    scales = _Scales()
    out, skipped = SampleList(), []
    for i, row in enumerate(rows, start=2):
        where = f"{path}:{i}"
        cell_type = _norm_cell_type(row.get("label"), where)
        attrs = {n: _norm_attr(n, row.get(n), where) for n in _HEALTHY_NAMES}
        split = (row.get("wbcatt_split") or file_split or "").lower() or None
        if split is not None and split not in SPLITS:
            raise DatasetError(f"{where}: unknown split {split!r}")
        try:
            img_path = _wbcatt_image(row, root)
        except DatasetError as exc:
            _skip_or_raise(DatasetError(f"{where}: {exc}"), where, skip_missing, skipped)
            continue
        box = _row_box(row, ("wbc_xmin", "wbc_ymin", "wbc_xmax", "wbc_ymax"), where)
        try:
            image, meta = _load_image_mpp(img_path)
            sc = scales.get(img_path, image, meta, fr.mpp, given_src, str(img_path)) if fr.physical else None
        except DatasetError as exc:
            _skip_or_raise(DatasetError(f"{where}: {exc}"), f"{where} ({img_path.name})", skip_missing, skipped)
            continue
        if box is None:
            box = _txl_label_box(img_path, image.shape[1], image.shape[0])
        center = (image.shape[1] / 2, image.shape[0] / 2) if box is None else None
        crop, used_mpp, used_src = _finish(image, box, fr, scale=sc, center=center)
        sample_id = Path(row.get("img_name") or img_path.name).stem
        out.append(CaptionSample(
            image=crop,
            caption=render_caption(cell_type, "healthy", attrs), cell_type=cell_type, case="healthy",
            attributes=attrs, sample_id=sample_id, source="wbcatt", split=split,
            mpp=used_mpp, mpp_source=used_src))
    out.skipped = skipped
    _warn_skipped(path, skipped)
    return out


def _row_box(row: Mapping[str, str], cols: Sequence[str], where: str) -> tuple[float, ...] | None:
    raw = [row.get(c) for c in cols]
    if all(v in (None, "") for v in raw):
        return None
    try:
        box = tuple(float(v) for v in raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: box columns {', '.join(cols)} must all be numbers, got {raw}") from None
    if not (box[2] > box[0] and box[3] > box[1]):
        raise DatasetError(f"{where}: box {box} has no area (need x1 > x0 and y1 > y0)")
    return box


# --------------------------------------------------------------------------- LeukemiaAttri
_CASE_FIELDS = ("case", "case_context", "diagnosis", "leukemia_type", "cancer_type")


def read_leukemia_attri(coco_json: str | Path, image_root: str | Path | None = None, *,
                        skip_missing: bool = False, crop_px: int | None = None,
                        scale: float = 2.5, mpp: float | None = None, framing: str = "physical",
                        crop_um: float = CROP_UM, pad: str = "reflect") -> SampleList:
    """Read LeukemiaAttri-style COCO JSON: one sample per annotation, cropped around its bbox.

    Accepted fields: ``images[]``: ``id``, ``file_name`` (relative to ``image_root``, default the
    JSON's folder), optional case field; ``categories[]``: ``id``, ``name`` (the cell type);
    ``annotations[]``: ``id``, ``image_id``, ``category_id``, ``bbox`` = [x, y, w, h] px, and the
    attribute fields ``cell_size, nuclear_chromatin, nuclear_shape, nucleolus, cytoplasm,
    cytoplasmic_basophilia, cytoplasmic_vacuoles`` either on the annotation or in its
    ``attributes`` object (value words case-insensitive; missing/blank = unknown). The case is the
    first of ``case, case_context, diagnosis, leukemia_type, cancer_type`` on the annotation, its
    ``attributes``, or else the image (a code such as ``AML`` or the full name). The crop is the
    job's around the bbox centre, at the image's scale: TIFF tags, else an image's ``mpp`` field,
    else ``mpp``, else its red-cell estimate (module docstring).
    """
    fr = _Framing(framing, crop_um, crop_px, pad, scale, mpp)
    scales = _Scales()
    path = Path(coco_json)
    root = Path(image_root) if image_root is not None else path.parent
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")):
        raise DatasetError(f"{path}: not COCO JSON: needs lists 'images', 'annotations', 'categories'")
    categories = {}
    for c in doc["categories"]:
        categories[c.get("id")] = _norm_cell_type(c.get("name"), f"{path}: category {c.get('id')}")
    images = {im.get("id"): im for im in doc["images"]}
    cache: dict[object, tuple[np.ndarray, float | None] | DatasetError] = {}
    out, skipped = SampleList(), []
    for k, ann in enumerate(doc["annotations"]):
        ann_id = ann.get("id", k)
        where = f"{path}: annotation {ann_id}"
        im = images.get(ann.get("image_id"))
        if im is None:
            raise DatasetError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in categories:
            raise DatasetError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)
                and bbox[2] > 0 and bbox[3] > 0):
            raise DatasetError(f"{where}: bbox must be [x, y, w, h] with w, h > 0, got {bbox!r}")
        extra = ann.get("attributes") if isinstance(ann.get("attributes"), dict) else {}
        attrs = {}
        for field_name, name in LEUKEMIA_ATTRI_FIELDS.items():
            raw = ann.get(field_name, extra.get(field_name))
            attrs[name] = _norm_attr(name, raw, where)
        raw_case = next((src[f] for src in (ann, extra, im) for f in _CASE_FIELDS if src.get(f) not in (None, "")), None)
        case = _norm_case(raw_case, where)
        cell_type = categories[ann["category_id"]]
        key = im.get("id")
        if key not in cache:
            try:
                cache[key] = _load_image_mpp(dataset_path(root, str(im.get("file_name", ""))))
            except DatasetError as exc:
                cache[key] = exc
        loaded = cache[key]
        if isinstance(loaded, DatasetError):
            _skip_or_raise(DatasetError(f"{where}: {loaded}"), where, skip_missing, skipped)
            continue
        image, meta = loaded
        sc = None
        if fr.physical:
            given, given_src = fr.mpp, "given"
            if im.get("mpp") not in (None, ""):
                given = _check_mpp(im.get("mpp"))
                if given is None:
                    raise DatasetError(f"{where}: image mpp must be µm/px within [{_MPP_RANGE[0]:g}, "
                                       f"{_MPP_RANGE[1]:g}], got {im.get('mpp')!r}")
            try:
                sc = scales.get(key, image, meta, given, given_src, str(im.get("file_name")))
            except DatasetError as exc:
                _skip_or_raise(DatasetError(f"{where}: {exc}"), where, skip_missing, skipped)
                continue
        x, y, w, h = (float(v) for v in bbox)
        crop, used_mpp, used_src = _finish(image, (x, y, x + w, y + h), fr, scale=sc)
        split = str(im.get("split") or ann.get("split") or "").lower() or None
        out.append(CaptionSample(
            image=crop,
            caption=render_caption(cell_type, case, attrs), cell_type=cell_type, case=case,
            attributes=attrs, sample_id=f"{Path(str(im.get('file_name'))).stem}#{ann_id}",
            source="leukemia_attri", split=split if split in SPLITS else None,
            mpp=used_mpp, mpp_source=used_src))
    out.skipped = skipped
    _warn_skipped(path, skipped)
    return out


# --------------------------------------------------------------------------- generic CSV
def read_generic_csv(csv_path: str | Path, image_root: str | Path | None = None, *,
                     skip_missing: bool = False, crop_px: int | None = None,
                     scale: float = 2.5, mpp: float | None = None, framing: str = "physical",
                     crop_um: float = CROP_UM, pad: str = "reflect") -> SampleList:
    """Read a generic caption CSV.

    Columns: ``image`` (path relative to ``image_root``, default the CSV's folder; required),
    optional box ``x0, y0, x1, y1`` px (the job's crop around its centre at the image's scale:
    TIFF tags, else an ``mpp`` column, else ``mpp``, else the red-cell estimate; blank = the
    image is already a crop, taken as given: padded to a square, resized to ``crop_px`` if
    given), and ``caption`` and/or any of ``cell_type``, ``case`` and ontology attribute columns
    (blank = unknown). A column present is the truth for its field (even when blank); fields
    without a column are parsed from the caption; without a caption, the caption is rendered
    from the columns. Optional ``sample_id``, ``source``, ``split`` (train/val/test), and for an
    image that is already a crop ``source_mpp``/``mpp_source``: the scale of the image it was
    cut from (as :func:`write_generic_csv` records it).
    """
    fr = _Framing(framing, crop_um, crop_px, pad, scale, mpp)
    scales = _Scales()
    path = Path(csv_path)
    root = Path(image_root) if image_root is not None else path.parent
    header, rows = _open_csv(path)
    if "image" not in header:
        raise DatasetError(f"{path}: generic CSV needs an 'image' column (has: {', '.join(header)})")
    attr_cols = [n for n in ATTRIBUTE_NAMES if n in header]
    has_labels = bool(attr_cols) or "cell_type" in header or "case" in header
    if "caption" not in header and not has_labels:
        raise DatasetError(f"{path}: needs a 'caption' column or cell_type/case/attribute columns")
    present_box = [c for c in _BOX_COLUMNS if c in header]
    if present_box and len(present_box) != 4:
        raise DatasetError(f"{path}: box needs all of x0, y0, x1, y1 (has {', '.join(present_box)})")
    out, skipped = SampleList(), []
    for i, row in enumerate(rows, start=2):
        where = f"{path}:{i}"
        if not row.get("image"):
            raise DatasetError(f"{where}: empty 'image'")
        caption = row.get("caption") or ""
        if not caption and not has_labels:
            raise DatasetError(f"{where}: empty caption")
        # A column, even blank, is the truth for its field; fields without a column come from
        # the caption (when there is one).
        parsed = parse_caption(caption) if caption else None
        cell_type = (_norm_cell_type(row.get("cell_type"), where) if "cell_type" in header
                     else parsed.cell_type if parsed else None)
        case = (_norm_case(row.get("case"), where) if "case" in header
                else parsed.case if parsed else None)
        attrs = {n: (_norm_attr(n, row.get(n), where) if n in attr_cols
                     else parsed.attributes[n] if parsed else None) for n in ATTRIBUTE_NAMES}
        if not caption:
            caption = render_caption(cell_type, case, attrs)
        split = (row.get("split") or "").lower() or None
        if split is not None and split not in SPLITS:
            raise DatasetError(f"{where}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        box = _row_box(row, _BOX_COLUMNS, where) if present_box else None
        given = fr.mpp
        for col in ("mpp", "source_mpp"):
            if row.get(col) not in (None, "") and _check_mpp(row.get(col)) is None:
                raise DatasetError(f"{where}: {col} must be µm/px within [{_MPP_RANGE[0]:g}, "
                                   f"{_MPP_RANGE[1]:g}], got {row.get(col)!r}")
        if row.get("mpp") not in (None, ""):
            given = _check_mpp(row["mpp"])
        try:
            img_path = dataset_path(root, row["image"])
            image, meta = _load_image_mpp(img_path)
            sc = (scales.get(img_path, image, meta, given, "given", str(img_path))
                  if fr.physical and box is not None else None)
        except DatasetError as exc:
            _skip_or_raise(DatasetError(f"{where}: {exc}"), f"{where} ({row['image']})", skip_missing, skipped)
            continue
        crop, used_mpp, used_src = _finish(image, box, fr, scale=sc)
        if box is None and row.get("source_mpp") not in (None, ""):
            used_mpp = _check_mpp(row["source_mpp"])
            used_src = " ".join(str(row.get("mpp_source") or "").split())[:32] or None
        out.append(CaptionSample(
            image=crop, caption=caption, cell_type=cell_type,
            case=case, attributes=attrs, sample_id=row.get("sample_id") or Path(row["image"]).stem,
            source=row.get("source") or path.stem, split=split, mpp=used_mpp, mpp_source=used_src))
    out.skipped = skipped
    _warn_skipped(path, skipped)
    return out


def write_generic_csv(samples: Sequence[CaptionSample], out_dir: str | Path,
                      name: str = "samples.csv") -> Path:
    """Write crops as PNG under ``out_dir/images/`` and a generic CSV that
    :func:`read_generic_csv` reads back to the same samples (crops taken as given; the scale
    they were cut at kept as ``source_mpp``/``mpp_source``). Returns the CSV path."""
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    csv_path = out / name
    cols = ["image", "sample_id", "source", "split", "caption", "cell_type", "case", *ATTRIBUTE_NAMES,
            "source_mpp", "mpp_source"]
    seen: set[str] = set()
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for s in samples:
            stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{s.source}_{s.sample_id}")
            if stem in seen:
                raise DatasetError(f"{csv_path}: duplicate sample {s.source}/{s.sample_id}")
            seen.add(stem)
            rel = f"images/{stem}.png"
            Image.fromarray(s.image).save(out / rel)
            w.writerow({"image": rel, "sample_id": s.sample_id, "source": s.source,
                        "split": s.split or "", "caption": s.caption, "cell_type": s.cell_type or "",
                        "case": s.case or "", **{n: s.attributes.get(n) or "" for n in ATTRIBUTE_NAMES},
                        "source_mpp": "" if s.mpp is None else repr(float(s.mpp)), "mpp_source": s.mpp_source or ""})
    return csv_path


# --------------------------------------------------------------------------- dispatch
def load_dataset(spec: str | Path, *, skip_missing: bool = False, crop_px: int | None = None) -> SampleList:
    """Load a dataset by its file: ``*.json`` -> LeukemiaAttri COCO; ``*.csv`` -> WBCAtt when it has
    WBCAtt's columns (``img_name``, ``label``, attributes) else generic; a directory -> its
    ``samples.csv`` (generic) or, for the shared-data folder (``txl_pbc/pbc_wbcatt.csv`` inside),
    :func:`build_demo_dataset`."""
    path = Path(spec)
    if path.is_dir():
        if (path / "samples.csv").is_file():
            return read_generic_csv(path / "samples.csv", skip_missing=skip_missing, crop_px=crop_px)
        if (path / "txl_pbc" / "pbc_wbcatt.csv").is_file():
            return build_demo_dataset(path)
        raise DatasetError(f"{path}: directory has no samples.csv and is not the shared data folder")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return read_leukemia_attri(path, skip_missing=skip_missing, crop_px=crop_px)
    if suffix == ".csv":
        header, _ = _open_csv(path)
        if "label" in header and "img_name" in header and all(n in header for n in _HEALTHY_NAMES):
            return read_wbcatt(path, path.parent, skip_missing=skip_missing, crop_px=crop_px)
        return read_generic_csv(path, skip_missing=skip_missing, crop_px=crop_px)
    if not path.exists():
        raise DatasetError(f"{path}: dataset file not found")
    raise DatasetError(f"{path}: unknown dataset format (expected .csv, .json or a directory)")


# --------------------------------------------------------------------------- demo dataset
_SEG_LABELS = {"1": "neutrophil", "2": "lymphocyte", "3": "monocyte", "4": "eosinophil", "5": "basophil"}


def _bccd(root: Path, fr: _Framing, skipped: list[Skipped]) -> list[CaptionSample]:
    types_csv = root / "wbc_types.csv"
    _header, rows = _open_csv(types_csv)
    scales = _Scales()
    out = []
    for i, row in enumerate(rows, start=2):
        image_id = int(row["Image"])
        name = f"BloodImage_{image_id:05d}"
        item = f"{types_csv}:{i} ({name})"
        labels = [t.strip() for t in (row.get("Category") or "").split(",") if t.strip()]
        if not labels:
            skipped.append(Skipped(item, "no WBC type given"))
            continue
        if len(labels) > 1:
            skipped.append(Skipped(item, f"several WBCs ({', '.join(labels)}): ambiguous"))
            continue
        xml_path = root / "Annotations" / f"{name}.xml"
        img_path = root / "JPEGImages" / f"{name}.jpg"
        if not xml_path.is_file() or not img_path.is_file():
            skipped.append(Skipped(item, "image or annotation file not in the dataset"))
            continue
        try:
            tree = ET.parse(xml_path)
        except ET.ParseError as exc:
            skipped.append(Skipped(item, f"{xml_path}: unreadable XML ({exc})"))
            continue
        boxes = []
        for obj in tree.getroot().iter("object"):
            if (obj.findtext("name") or "").strip().upper() == "WBC":
                bb = obj.find("bndbox")
                boxes.append(tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
        if not boxes:
            skipped.append(Skipped(item, f"no WBC box in {xml_path.name}"))
            continue
        if len(boxes) > 1:
            skipped.append(Skipped(item, f"{len(boxes)} WBC boxes in {xml_path.name}: ambiguous"))
            continue
        cell_type = cell_type_from_label(labels[0])
        try:
            image, meta = _load_image_mpp(img_path)
            given, given_src = (BCCD_MPP, "dataset") if fr.mpp is None else (fr.mpp, "given")
            sc = scales.get(img_path, image, meta, given, given_src, str(img_path)) if fr.physical else None
        except DatasetError as exc:
            skipped.append(Skipped(item, str(exc)))
            continue
        crop, used_mpp, used_src = _finish(image, boxes[0], fr, scale=sc)
        out.append(CaptionSample(
            image=crop, caption=render_caption(cell_type, None, {}), cell_type=cell_type, case=None,
            attributes={}, sample_id=name, source="bccd", mpp=used_mpp, mpp_source=used_src))
    return out


def _segmentation_wbc(root: Path, fr: _Framing, skipped: list[Skipped]) -> list[CaptionSample]:
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and (p / "labels.csv").is_file()):
        _header, rows = _open_csv(sub / "labels.csv")
        for i, row in enumerate(rows, start=2):
            values = list(row.values())
            image_id, label = str(values[0]).strip(), str(values[1]).strip()
            item = f"{sub / 'labels.csv'}:{i}"
            if label not in _SEG_LABELS:
                skipped.append(Skipped(item, f"unknown class label {label!r}"))
                continue
            img_path = sub / f"{int(image_id):03d}.png"
            mask_path = sub / f"{int(image_id):03d}_mask.png"
            try:
                image, meta = _load_image_mpp(img_path)
            except DatasetError as exc:
                skipped.append(Skipped(item, str(exc)))
                continue
            box, center = None, None
            if mask_path.is_file():
                mask = _load_image(mask_path)[:, :, 0] > 0
                ys, xs = np.nonzero(mask)
                if len(xs):
                    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
                    # the cell mask's centroid: where the job's detector puts a cell's centre
                    center = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
            if center is None:  # a single-cell crop: the cell is in the middle
                center = (image.shape[1] / 2, image.shape[0] / 2)
            sc = None
            if fr.physical:
                if meta is not None:
                    sc = (meta, "metadata")
                elif fr.mpp is not None:
                    sc = (fr.mpp, "given")
                elif sub.name in SEGMENTATION_WBC_MPP:
                    sc = (SEGMENTATION_WBC_MPP[sub.name], "dataset")
                else:
                    skipped.append(Skipped(item, f"{img_path}: no scale: no TIFF resolution tags, no mpp given, "
                                                 f"and {sub.name!r} is not a segmentation_WBC part with a known scale"))
                    continue
            crop, used_mpp, used_src = _finish(image, box, fr, scale=sc, center=center)
            cell_type = _SEG_LABELS[label]
            out.append(CaptionSample(
                image=crop,
                caption=render_caption(cell_type, None, {}), cell_type=cell_type, case=None,
                attributes={}, sample_id=f"{sub.name}_{int(image_id):03d}", source="segmentation_wbc",
                mpp=used_mpp, mpp_source=used_src))
    return out


def build_demo_dataset(shared_data_dir: str | Path, *, crop_px: int | None = CROP_PX,
                       scale: float = 2.5, framing: str = "physical", crop_um: float = CROP_UM,
                       pad: str = "reflect") -> SampleList:
    """The demo checkpoint's training data from the shared data folder.

    * ``txl_pbc/pbc_wbcatt.csv``: 450 PBC cells, full healthy captions, split = WBCAtt's own
      (``wbcatt_split``); cropped around the WBC box's centre (for the 23 rows without a single
      box in the CSV, the TXL YOLO WBC box nearest the image centre); scale: :data:`PBC_MPP`
      (one instrument, one scale, as the job reads one scale per slide).
    * ``bccd``: images with exactly one typed WBC (one type in ``wbc_types.csv`` and one WBC box in
      the VOC XML) -> cell-type captions; others are recorded in ``.skipped``. Scale:
      :data:`BCCD_MPP`.
    * ``segmentation_wbc``: every labelled crop, cropped around its cell mask's centroid ->
      cell-type captions. Scale: :data:`SEGMENTATION_WBC_MPP` (measured once per part).

    Every crop is the job's (module docstring): ``crop_um`` µm, ``crop_px`` px (default 224),
    mirrored past the image border; ``framing="box"`` gives the old ``scale`` x box crops. Only
    the PBC cells carry a split; use :func:`split_samples` for the rest.
    """
    root = Path(shared_data_dir)
    pbc_csv = root / "txl_pbc" / "pbc_wbcatt.csv"
    if not pbc_csv.is_file():
        raise DatasetError(f"{pbc_csv}: not found; is {root} the shared data folder?")
    fr = _Framing(framing, crop_um, crop_px, pad, scale)
    pbc = read_wbcatt(pbc_csv, root / "txl_pbc", crop_px=crop_px, scale=scale, framing=framing,
                      crop_um=crop_um, pad=pad)
    for s in pbc:
        s.source = "pbc_wbcatt"
    skipped: list[Skipped] = list(pbc.skipped)
    samples: list[CaptionSample] = list(pbc)
    if (root / "bccd").is_dir():
        samples += _bccd(root / "bccd", fr, skipped)
    if (root / "segmentation_wbc").is_dir():
        samples += _segmentation_wbc(root / "segmentation_wbc", fr, skipped)
    return SampleList(samples, skipped)


def split_samples(samples: Sequence[CaptionSample], val_fraction: float = 0.1,
                  seed: int = 0) -> dict[str, list[CaptionSample]]:
    """Assign samples without a split to train/val, stratified by cell type; keep existing splits.

    Deterministic for a given ``seed`` and set of ``sample_id``s (input order does not matter).
    Returns ``{"train": [...], "val": [...], "test": [...]}`` with each sample's ``split`` set
    (copies; the inputs are not modified).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out: dict[str, list[CaptionSample]] = {s: [] for s in SPLITS}
    groups: dict[str, list[CaptionSample]] = defaultdict(list)
    for s in samples:
        if s.split is not None:
            out[s.split].append(s)
        else:
            groups[s.cell_type or ""].append(s)
    for cell_type in sorted(groups):
        members = sorted(groups[cell_type], key=lambda s: (s.source, s.sample_id))
        random.Random(f"{seed}:{cell_type}").shuffle(members)
        n_val = int(round(len(members) * val_fraction))
        for j, s in enumerate(members):
            split = "val" if j < n_val else "train"
            out[split].append(replace(s, split=split))
    return out
