"""What every dataset reader shares: the sample types, image loading, the job's crop (framing
and scale), value normalisation to the ontology, CSV reading, skip bookkeeping and splits."""

from __future__ import annotations

import csv
import math
import random
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hemblip.crops import CROP_PX, CROP_UM, PADS, cell_crop
from hemblip.errors import DatasetError, HemblipConfigError
from hemblip.ontology import ATTRIBUTE_NAMES, ATTRIBUTES, CASE_NAMES, cell_type_from_label

__all__ = [
    "CaptionSample",
    "SampleList",
    "Skipped",
    "crop_around_box",
    "split_samples",
    "read_csv_table",
    "SPLITS",
    "FRAMINGS",
]

SPLITS = ("train", "val", "test")
#: "physical": the job's crop (default); "box": ``scale`` x the cell's box (comparisons only).
FRAMINGS = ("physical", "box")
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
            raise DatasetError(
                f"sample {self.sample_id}: split must be one of {SPLITS}, got {self.split!r}"
            )
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
        out[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = img[sy0:sy1, sx0:sx1]
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
        raise DatasetError(
            f"{path}: cannot decode image ({exc.__class__.__name__}: {exc})"
        ) from None


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
            raise HemblipConfigError(
                f"framing must be one of {', '.join(FRAMINGS)}, got {self.framing!r}"
            )
        if self.pad not in PADS:
            raise HemblipConfigError(f"pad must be one of {', '.join(PADS)}, got {self.pad!r}")
        if self.mpp is not None and _check_mpp(self.mpp) is None:
            raise HemblipConfigError(
                f"mpp must be a scale in µm/px within [{_MPP_RANGE[0]:g}, "
                f"{_MPP_RANGE[1]:g}], got {self.mpp!r}"
            )
        if self.crop_px is not None and not (
            isinstance(self.crop_px, int) and 16 <= self.crop_px <= 4096
        ):
            raise HemblipConfigError(
                f"crop_px must be an integer in [16, 4096], got {self.crop_px!r}"
            )
        if not (
            isinstance(self.crop_um, int | float)
            and math.isfinite(self.crop_um)
            and 0 < self.crop_um <= 500
        ):
            raise HemblipConfigError(
                f"crop_um must be a number of µm in (0, 500], got {self.crop_um!r}"
            )

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

    def get(
        self,
        key: object,
        image: np.ndarray,
        meta: float | None,
        given: float | None,
        given_source: str,
        where: str,
    ) -> tuple[float, str]:
        """``(mpp, source)`` as the job settles it: metadata, else given, else the red-cell
        estimate; DatasetError naming ``where`` when there is none."""
        if meta is not None:
            return meta, "metadata"
        if given is not None:
            return given, given_source
        if key not in self._cache:
            from hemblip.scale import estimate_image_mpp

            h, w = image.shape[:2]
            est = (
                estimate_image_mpp(lambda b: image[b[1] : b[3], b[0] : b[2]], w, h)
                if min(h, w) >= 2
                else None
            )
            if est is None or _check_mpp(est) is None:
                raise DatasetError(
                    f"{where}: no scale for the image: no TIFF resolution tags, no mpp given, "
                    "and too few red cells to estimate it; pass mpp= (or an 'mpp' column)"
                )
            self._cache[key] = (float(est), "estimated")
        return self._cache[key]


def _box_center(box: Sequence[float]) -> tuple[float, float]:
    return (float(box[0]) + float(box[2])) / 2, (float(box[1]) + float(box[3])) / 2


def _finish(
    image: np.ndarray,
    box: Sequence[float] | None,
    fr: _Framing,
    *,
    scale: tuple[float, str] | None = None,
    center: tuple[float, float] | None = None,
) -> tuple[np.ndarray, float | None, str | None]:
    """``(crop, mpp, mpp_source)`` of the cell at ``center`` (default: the box's centre; neither:
    the image is already a crop, padded to a square as given)."""
    img = _as_rgb(image)
    if fr.physical and scale is not None and (center is not None or box is not None):
        c = center if center is not None else _box_center(box)  # type: ignore[arg-type]
        crop = cell_crop(
            img, c, scale[0], crop_um=fr.crop_um, crop_px=fr.crop_px or CROP_PX, pad=fr.pad
        )
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
    aliases = {
        "scant": "scanty",
        "purple-blue": "purple blue",
        "light-blue": "light blue",
        "dense": "densely",
        "loose": "loosely",
        "big": "big",
        "absent": "absent",
    }
    text = aliases.get(text, text)
    if name == "leukemic_cell_size" and text == "big":
        text = "large"
    if name == "cell_size" and text == "large":
        text = "big"
    for v in values:
        if text == v or text.replace(" ", "-") == v or text.replace("-", " ") == v:
            return v
    raise DatasetError(
        f"{where}: attribute {name}: unknown value {raw!r}; expected one of {'|'.join(values)}"
    )


def _norm_case(raw: object, where: str) -> str | None:
    if raw is None:
        return None
    text = " ".join(str(raw).strip().replace("_", " ").split())
    if text.lower() in ("", "na", "none", "unknown", "null"):
        return None
    for code, name in CASE_NAMES.items():
        if text.upper() == code.upper() or text.lower() in (
            name,
            name.replace("leukemia", "leukaemia"),
        ):
            return code
    if text.lower() in ("normal", "healthy control", "control", "healthy donor"):
        return "healthy"
    raise DatasetError(
        f"{where}: unknown case {raw!r}; expected one of {', '.join(CASE_NAMES)} or its full name"
    )


def _norm_cell_type(raw: object, where: str) -> str | None:
    if raw is None or not str(raw).strip():
        return None
    try:
        return cell_type_from_label(str(raw))
    except ValueError as exc:
        raise DatasetError(f"{where}: {exc}") from None


def read_csv_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """``(header, rows)`` of a dataset CSV (UTF-8, BOM allowed), names and values stripped;
    :class:`~hemblip.errors.DatasetError` naming the file when it is missing or not a CSV."""
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = [h.strip() for h in (reader.fieldnames or [])]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a readable CSV ({exc})") from None
    rows = [
        {(k or "").strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items()}
        for r in rows
    ]
    return header, rows


def _skip_or_raise(
    err: DatasetError, item: str, skip_missing: bool, skipped: list[Skipped]
) -> None:
    if not skip_missing:
        raise err
    skipped.append(Skipped(item, str(err)))


def _warn_skipped(path: Path, skipped: list[Skipped]) -> None:
    if skipped:
        warnings.warn(
            f"{path}: skipped {len(skipped)} item(s); first: {skipped[0].item}: "
            f"{skipped[0].reason}",
            stacklevel=3,
        )


def _row_box(row: Mapping[str, str], cols: Sequence[str], where: str) -> tuple[float, ...] | None:
    raw = [row.get(c) for c in cols]
    if all(v in (None, "") for v in raw):
        return None
    try:
        box = tuple(float(v) for v in raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DatasetError(
            f"{where}: box columns {', '.join(cols)} must all be numbers, got {raw}"
        ) from None
    if not (box[2] > box[0] and box[3] > box[1]):
        raise DatasetError(f"{where}: box {box} has no area (need x1 > x0 and y1 > y0)")
    return box


def split_samples(
    samples: Sequence[CaptionSample], val_fraction: float = 0.1, seed: int = 0
) -> dict[str, list[CaptionSample]]:
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
