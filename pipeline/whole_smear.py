"""Seeded whole-smear slides built from real smear fields, with their truth.

A peripheral-blood smear seen whole is mostly not where a hematologist reads. Along the smear's
long axis (slide x) :func:`build_whole_smear` lays out, from left to right:

* glass margin (the slide beyond the drop);
* **thick end**: red cells piled and overlapping (areal density 3.0 falling to 1.6 monolayer
  red-cell areas per area), drawn 10 % smaller, so the field is dark and textureless;
* **monolayer** (the reading zone): red cells just touching (0.9 falling to 0.6);
* **feathered edge**: sparse, flattened (25 % larger), paler cells (0.4 falling to 0.1);
* glass beyond the feathered edge, and glass bands above and below the smear.

Zone boundaries are parallel curves (the smear's tongue shape: the feathered edge is convex) and
a few elliptical gaps (glass) lie inside the thick end and the monolayer. Cells are real: red
cells and white cells are cut (soft elliptical masks) from TXL-PBC fields of one source per slide
(``txl_pbc``, MIT, see ``/work/shared/data/README.md``), resampled to the slide's scale, and
composed in optical density (Beer-Lambert: overlapping red cells add up, so piled cells are
darker); white cells are laid over the red cells. A white cell's type is kept where the datasets
know it (PBC: WBCAtt label; BCCD: ``wbc_types.csv`` for one-WBC images).

**One stain per slide.** A real smear is stained once, so all its red cells share one colour and
its nuclei another; the fields of one TXL-PBC source do not (Kaggle BCD's are augmented in
brightness and hue: per-field red-cell OD varies 5x and its chroma by up to 0.24 L1; Raabin's
come from many smears). Cutting sprites from many fields therefore put differently stained red
cells side by side, and the darker off-stain ones passed the detector's nucleus-colour check
(Kaggle precision 0.20 on a 72 MP smear). Each field's stain is measured on its labelled cells,
in OD: the red cells' vector (the darker half of each cell, median over cells) and the nuclei's
(the darkest fifth of its white cells, the detector's own rule), and every pixel of the field's
sprites, white and red cells alike, is mapped by one 3x3 matrix to the stain of a reference field
(:func:`_stain_map`: red-cell vector to the reference's exactly, nucleus vector to the reference
nucleus' hue at the field's own nucleus-to-red strength, the rest scaled as the red cells). The
reference is a seeded pick among the half of the fields nearest the source's median stain: a real
stain, a typical one, different between seeds as between laboratories. Chosen over the two
simpler ways: picking fields of one stain cluster leaves Kaggle (44 val fields, ~1 white cell
each, all augmented differently) with a handful of white cells per slide; a per-channel OD scale
fitted on red cells alone leaves the nuclei's hue as scattered as before (Kaggle, per field,
nucleus chroma 90th percentile 0.38 L1 from the median before it, 0.44 after; with the two-vector
map the white-cell sprites' 90th percentile falls from 0.39 to 0.06). Nuclei of the five PBC cell
types differ by at most 0.03 in chroma, so mapping every nucleus to one hue loses no type
signal. The map is well conditioned on every val field (red/nucleus OD angle 10.7-45 degrees,
matrix condition number at most 2.8, OD gain 0.42-2.7) and leaves the within-field spread of
red-cell colour as it was (Kaggle 90th percentile 0.127 -> 0.133 L1); fields whose stain cannot
be measured (under 3 red cells) or mapped (angle under 8 degrees, OD gain over 3x) are left out
and counted in the truth (``stain.fields_left_out``; none today).

**White-cell sprites** are the labelled box grown 10 %, drawn inside its ellipse less the
field's own red cells outside the white cell (the ellipse cut through them: drawn, they were
half cells and crescents overlapping the slide's red cells); a white cell whose grown ellipse
reaches another labelled white cell is not used (its sprite would draw part of a cell that no
truth box holds).

The slide is rendered in 256-px tile rows and written tile by tile (never the whole level 0):
JPEG tiles, 4x downsamples (level 1 from a raw file of 4x-reduced bands written while level 0
is written and read back in strips, level 2 from those strips, the rest in memory), at most
64 tiles buffered for the encoder, consecutive TIFF pages, as Aperio SVS (``|MPP =`` in the description) or a
generic BigTIFF with resolution tags. Beside it, ``<stem>.truth.json`` (every white cell's box in
level-0 px, type where known, zone; zone areas in mm² and the layout) and ``<stem>.zones.npz``
(the truth zone raster, codes of :data:`pipeline.zones.ZONE_NAMES`) and ``.zones.png``. Each
truth white cell has ``zone`` (the true zone at its box centre) and ``ring_zone`` (the pipeline's
rule for a cell's zone, :func:`pipeline.detect.cell_zone`, applied to the true zones), and the
truth records the slide's ``stain``.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, PipelineError
from pipeline.zones import FEATHERED, GLASS, MONOLAYER, THICK, ZONE_NAMES, render_labels_png

__all__ = [
    "SmearSpec",
    "WholeSmear",
    "WholeSmearError",
    "SOURCE_MPP",
    "DEFAULT_DATA_DIR",
    "build_whole_smear",
    "smear_gigapixels",
]

DEFAULT_DATA_DIR = Path("/work/shared/data")
#: Level-0 µm/px of each TXL-PBC source: median red-cell estimate
#: (:func:`pipeline.detection.estimate_mpp`) over 25 train fields of it.
SOURCE_MPP = {"pbc": 0.111, "raabin": 0.068, "kaggle": 0.121, "bccd": 0.086}
_TXL_SOURCE = {"pbc": "pbc", "raabin_wbc?": "raabin", "bcd_kaggle?": "kaggle", "bccd": "bccd"}
_TILE = 256
_CHUNK = 4096  # level-0 px rendered at once along x (one tile row high)
_OD_SCALE = 1000.0  # optical density stored as uint16 thousandths
_OD_MAX = 4000
_MAX_FIELDS = 80  # fields per slide's sprite library
_RBC_SPRITES = 96  # red-cell sprites per zone look (x 8 orientations)
_MIN_TOP_SIDE = 1024  # stop the 4x pyramid once the level's longer side is at most this
_WBC_GROW = 1.1  # a white-cell sprite is its labelled box grown this much (a rim of context)
#: Areal density (red-cell areas per unit area) at the start and end of each zone along x.
_RHO = {THICK: (3.0, 1.6), MONOLAYER: (0.9, 0.6), FEATHERED: (0.4, 0.1)}
#: (size factor, optical-density factor) of red cells per zone: piled cells look smaller,
#: feathered-edge cells are flattened (larger, thinner, paler).
_RBC_LOOK = {THICK: (0.9, 1.0), MONOLAYER: (1.0, 1.0), FEATHERED: (1.25, 0.65)}
#: White cells: small and dark in the thick end, flattened at the feathered edge.
_WBC_LOOK = {THICK: (0.8, 1.3), MONOLAYER: (1.0, 1.0), FEATHERED: (1.2, 0.8)}
#: White cells gather at the feathered edge (they are pushed there as the smear is drawn).
_WBC_ZONE_BOOST = {THICK: 0.5, MONOLAYER: 1.0, FEATHERED: 1.5}


class WholeSmearError(PipelineError, ValueError):
    """The generator's source data cannot be used; the message names the file."""


@dataclass(frozen=True)
class SmearSpec:
    """One whole-smear slide.

    ``width_mm`` x ``height_mm`` of scanned glass at ``mpp`` µm/px (level 0: 8 x 4 mm at 0.25 is
    32,000 x 16,000 px = 0.51 GP; 25 x 12.5 mm is 5 GP). ``monolayer_fraction``,
    ``thick_fraction``, ``feathered_fraction``: share of the slide's area in each zone before the
    gaps are cut (the rest is glass). ``source``: pbc | raabin | kaggle | bccd | auto (picked by
    the seed). ``split``: the TXL-PBC split the cells come from (val: fields the detector never
    trained on). ``wbc_per_mm2``: white cells per mm² of monolayer (real blood: ~25).
    ``n_gaps``: elliptical glass gaps inside the smear. ``fmt``: svs | tiff. ``truth_um``: µm/px
    of the truth zone raster. ``stain_gain``: every cell's optical density times this (a darker
    or paler stain of the same hue).
    """

    width_mm: float = 8.0
    height_mm: float = 4.0
    mpp: float = 0.25
    monolayer_fraction: float = 0.3
    thick_fraction: float = 0.15
    feathered_fraction: float = 0.1
    source: str = "auto"
    split: str = "val"
    wbc_per_mm2: float = 40.0
    n_gaps: int = 2
    fmt: str = "svs"
    jpeg_quality: int = 85
    truth_um: float = 4.0
    #: every cell's optical density times this (a darker or paler stain of the same hue)
    stain_gain: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        def num(name: str, lo: float, hi: float) -> None:
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not (math.isfinite(v) and lo <= v <= hi)
            ):
                raise ConfigError(f"SmearSpec.{name} must be a number in [{lo}, {hi}], got {v!r}")

        num("width_mm", 0.2, 75.0)
        num("height_mm", 0.2, 50.0)
        num("mpp", 0.1, 2.0)
        for name in ("monolayer_fraction", "thick_fraction", "feathered_fraction"):
            num(name, 0.0, 0.9)
        num("wbc_per_mm2", 0.0, 2000.0)
        num("truth_um", 1.0, 50.0)
        num("stain_gain", 0.3, 3.0)
        for name, lo, hi in (("n_gaps", 0, 20), ("jpeg_quality", 1, 100), ("seed", 0, 2**32 - 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(f"SmearSpec.{name} must be an integer in [{lo}, {hi}], got {v!r}")
        if self.source not in ("auto", *SOURCE_MPP):
            raise ConfigError(
                f"SmearSpec.source must be auto or one of {', '.join(SOURCE_MPP)}, got {self.source!r}"
            )
        if self.split not in ("train", "val"):
            raise ConfigError(f"SmearSpec.split must be train or val, got {self.split!r}")
        if self.fmt not in ("svs", "tiff"):
            raise ConfigError(f"SmearSpec.fmt must be svs or tiff, got {self.fmt!r}")
        total = self.monolayer_fraction + self.thick_fraction + self.feathered_fraction
        # The smear band leaves glass above, below and at both ends (see _layout).
        if total > 0.72:
            raise ConfigError(
                "SmearSpec.monolayer_fraction + thick_fraction + feathered_fraction must be at "
                f"most 0.72 (glass margins), got {total:.3f}"
            )
        if self.width_px * self.height_px > 2**36:
            raise ConfigError(f"SmearSpec: {self.width_px}x{self.height_px} px is too large")

    @property
    def width_px(self) -> int:
        return int(round(self.width_mm * 1000.0 / self.mpp))

    @property
    def height_px(self) -> int:
        return int(round(self.height_mm * 1000.0 / self.mpp))


def smear_gigapixels(spec: SmearSpec) -> float:
    """Level-0 size of ``spec``'s slide in gigapixels."""
    return spec.width_px * spec.height_px / 1e9


@dataclass(frozen=True)
class WholeSmear:
    """A generated slide: ``path``, ``truth_path`` (JSON), ``zones_path`` (npz raster),
    ``format`` as :func:`pipeline.slides.open_slide` reports it, ``n_wbc``, level-0 ``width`` x
    ``height`` px, ``areas_mm2`` per zone (truth), ``seconds`` spent."""

    path: Path
    truth_path: Path
    zones_path: Path
    format: str
    n_wbc: int
    width: int
    height: int
    areas_mm2: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


# --------------------------------------------------------------------------- cell library
@dataclass
class _Sprite:
    od: np.ndarray  # (h, w, 3) uint16 OD thousandths, masked
    mask: np.ndarray | None  # (h, w) uint8 0..255 (white cells: laid over)
    box: tuple[int, int, int, int] | None = None  # white cell's box within the sprite
    cell_type: str | None = None
    origin: str = ""


@dataclass
class _Library:
    source: str
    bg: np.ndarray  # (3,) float RGB of glass
    rbc: dict[int, list[_Sprite]]  # per zone look
    wbc: dict[int, list[_Sprite]]
    rbc_area_px: float  # mean monolayer red-cell area (level-0 px)
    rbc_diam_px: float
    stain: _Stain | None = None  # the slide's stain (one field's), every sprite mapped to it
    stain_origin: str = ""  # that field's TXL-PBC image id
    fields_unmapped: int = 0  # fields left out: their stain could not be mapped to it


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return [
                {(k or "").strip(): (v or "").strip() for k, v in r.items()}
                for r in csv.DictReader(fh)
            ]
    except FileNotFoundError:
        raise WholeSmearError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise WholeSmearError(f"{path}: unreadable CSV ({exc.__class__.__name__})") from None


def _yolo(path: Path, w: int, h: int) -> list[tuple[int, tuple[float, float, float, float]]]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise WholeSmearError(f"{path}: unreadable label file ({exc.__class__.__name__})") from None
    for n, line in enumerate(lines, 1):
        p = line.split()
        if not p:
            continue
        try:
            cls, cx, cy, bw, bh = int(p[0]), *(float(v) for v in p[1:5])
        except (ValueError, IndexError):
            raise WholeSmearError(f"{path}:{n}: expected 'class cx cy w h'") from None
        if not all(math.isfinite(v) for v in (cx, cy, bw, bh)) or bw <= 0 or bh <= 0:
            raise WholeSmearError(f"{path}:{n}: box with no area")
        out.append(
            (cls, ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h))
        )
    return out


def _types(root: Path) -> dict[str, str]:
    """uuid -> lower-case white-cell type, for one-WBC images whose type a dataset records."""
    out: dict[str, str] = {}
    bccd_types = {}
    for r in _read_csv(root / "bccd" / "wbc_types.csv"):
        cat = r.get("Category", "")
        if r.get("Image", "").isdigit() and cat and "," not in cat:
            bccd_types[f"BloodImage_{int(r['Image']):05d}"] = cat.lower()
    for r in _read_csv(root / "txl_pbc" / "source_map.csv"):
        if r.get("n_wbc") != "1":
            continue
        if r.get("source") == "pbc" and r.get("wbcatt_label"):
            out[r["uuid"]] = r["wbcatt_label"].lower()
        elif r.get("source") == "bccd" and r.get("original_name"):
            t = bccd_types.get(Path(r["original_name"]).stem)
            if t:
                out[r["uuid"]] = t
    return out


def _ellipse(h: int, w: int, grow: float = 1.0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ry, rx = max(h / 2 * grow, 1.0), max(w / 2 * grow, 1.0)
    r = np.sqrt(((yy + 0.5 - h / 2) / ry) ** 2 + ((xx + 0.5 - w / 2) / rx) ** 2)
    # 1 inside, a ~1.5 px soft rim: no hard cut-out edge in the JPEG.
    rim = 1.5 / max(min(rx, ry), 1.0)
    return np.clip((1.0 + rim - r) / rim, 0.0, 1.0)


def _resize(a: np.ndarray, f: float) -> np.ndarray:
    import cv2

    h, w = a.shape[:2]
    nw, nh = max(1, int(round(w * f))), max(1, int(round(h * f)))
    return cv2.resize(a, (nw, nh), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)


def _load_library(
    data_dir: Path, source: str, split: str, mpp: float, rng: np.random.Generator
) -> _Library:
    from PIL import Image, UnidentifiedImageError

    root = data_dir / "txl_pbc"
    rows = [
        r
        for r in _read_csv(root / "source_map.csv")
        if _TXL_SOURCE.get(r.get("source", "")) == source and r.get("txl_split") == split
    ]
    if not rows:
        raise WholeSmearError(f"{root / 'source_map.csv'}: no {source} fields in split {split}")
    order = rng.permutation(len(rows))[:_MAX_FIELDS]
    types = _types(data_dir)
    f = SOURCE_MPP[source] / mpp
    bgs, areas, diams, stains, field_ids = [], [], [], [], []
    # Sprites as cut (OD against their own field's glass), with their field's index in stains.
    rbc_base: list[tuple[np.ndarray, str, int]] = []
    # White cells also carry their drawn-area mask (see _wbc_mask).
    wbc_base: list[
        tuple[np.ndarray, tuple[float, float, float, float], str | None, str, int, np.ndarray]
    ] = []
    for i in order:
        uid = rows[i]["uuid"]
        if not all(c.isalnum() or c == "-" for c in uid):
            raise WholeSmearError(
                f"{root / 'source_map.csv'}: {uid[:60]!r} is not a plain image id"
            )
        img_path = root / "images" / split / f"{uid}.jpg"
        try:
            with Image.open(img_path) as im:
                if im.size[0] * im.size[1] > 4096 * 4096:
                    raise WholeSmearError(f"{img_path}: {im.size} px is not a microscope field")
                rgb = np.asarray(im.convert("RGB"), np.float32)
        except (OSError, UnidentifiedImageError) as exc:
            raise WholeSmearError(f"{img_path}: cannot decode ({exc.__class__.__name__})") from None
        h, w = rgb.shape[:2]
        lum = rgb.mean(2)
        bg = np.median(rgb[lum >= np.percentile(lum, 80)], axis=0)
        od = -np.log(np.clip(rgb / np.maximum(bg, 1.0), 1e-3, 1.0))
        boxes = _yolo(root / "labels" / split / f"{uid}.txt", w, h)
        stain = _field_stain(od, boxes)
        if stain is None:
            continue  # too few red cells to know its stain: it could not be matched to the slide's
        fi = len(stains)
        stains.append(stain)
        field_ids.append(uid)
        bgs.append(bg)
        od = _resize(od, f)
        wboxes = [b for c, b in boxes if c == 0]
        oh, ow = od.shape[:2]

        def crop(b, grow, od=od, ow=ow, oh=oh):
            x0, y0, x1, y1 = (v * f for v in b)
            cx, cy, bw, bh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * grow, (y1 - y0) * grow
            ix0, iy0 = int(math.floor(cx - bw / 2)), int(math.floor(cy - bh / 2))
            ix1, iy1 = int(math.ceil(cx + bw / 2)), int(math.ceil(cy + bh / 2))
            if ix0 < 0 or iy0 < 0 or ix1 > ow or iy1 > oh or ix1 - ix0 < 3 or iy1 - iy0 < 3:
                return None, None
            return od[iy0:iy1, ix0:ix1], (x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0)

        for c, b in boxes:
            if min(b[0], b[1], w - b[2], h - b[3]) < 3:
                continue  # cut by the field's edge: a half cell with a straight side
            side_um = ((b[2] - b[0]) + (b[3] - b[1])) / 2 * SOURCE_MPP[source]
            if c == 1 and 4.5 <= side_um <= 11.0:
                near = any(
                    b[0] < wb[2] + 4 and wb[0] - 4 < b[2] and b[1] < wb[3] + 4 and wb[1] - 4 < b[3]
                    for wb in wboxes
                )
                a, _ = crop(b, 1.0)
                if a is not None and not near:
                    rbc_base.append((a * _ellipse(*a.shape[:2])[..., None], uid, fi))
                    areas.append(math.pi / 4 * a.shape[0] * a.shape[1])
                    diams.append((a.shape[0] + a.shape[1]) / 2)
            elif c == 0 and 6.0 <= side_um <= 30.0:
                if any(_reaches(b, ob, _WBC_GROW) for ob in wboxes if ob is not b):
                    # Its sprite would carry part of another white cell, drawn but in no truth box.
                    continue
                a, inner = crop(b, _WBC_GROW)
                if a is not None:
                    t = types.get(uid) if len(wboxes) == 1 else None
                    ox, oy = b[0] * f - inner[0], b[1] * f - inner[1]  # crop origin, field px x f
                    reds = [
                        (r[0] * f - ox, r[1] * f - oy, r[2] * f - ox, r[3] * f - oy)
                        for c2, r in boxes
                        if c2 == 1
                    ]
                    keep = _wbc_mask(a.shape[:2], inner, reds)
                    wbc_base.append((a, inner, t, uid, fi, keep))
    if len(rbc_base) < 10 or not wbc_base:
        raise WholeSmearError(
            f"{root}: {source}/{split} gave {len(rbc_base)} red-cell and {len(wbc_base)} white-cell sprites"
        )
    # One stain per slide: every field's sprites, white and red cells alike, mapped to one real
    # field's stain (see _stain_map); fields that cannot be mapped are left out.
    ref_i = _reference_stain(stains, rng)
    ref = stains[ref_i]
    maps = [m if m is None else m.astype(np.float32) for m in (_stain_map(s, ref) for s in stains)]
    rbc_base = [
        (np.einsum("hwc,kc->hwk", a, maps[fi]).clip(0.0, None), u, fi)
        for a, u, fi in rbc_base
        if maps[fi] is not None
    ]
    wbc_base = [
        (np.einsum("hwc,kc->hwk", a, maps[fi]).clip(0.0, None), inner, t, u, fi, keep)
        for a, inner, t, u, fi, keep in wbc_base
        if maps[fi] is not None
    ]
    if len(rbc_base) < 10 or not wbc_base:
        raise WholeSmearError(
            f"{root}: {source}/{split} gave {len(rbc_base)} red-cell and {len(wbc_base)} white-cell "
            "sprites of one stain"
        )
    rbc: dict[int, list[_Sprite]] = {}
    wbc: dict[int, list[_Sprite]] = {}
    for z in (THICK, MONOLAYER, FEATHERED):
        sf, of = _RBC_LOOK[z]
        rbc[z] = [
            _Sprite(
                np.clip(_resize(a, sf) * of * _OD_SCALE, 0, _OD_MAX).astype(np.uint16),
                None,
                origin=u,
            )
            for a, u, _ in rbc_base
        ]
        sf, of = _WBC_LOOK[z]
        wl = []
        for a, inner, t, u, _, keep in wbc_base:
            r = _resize(a, sf)
            m = np.clip(np.round(_resize(keep, sf) * 255), 0, 255).astype(np.uint8)
            sx, sy = r.shape[1] / a.shape[1], r.shape[0] / a.shape[0]
            box = (
                int(round(inner[0] * sx)),
                int(round(inner[1] * sy)),
                int(round(inner[2] * sx)),
                int(round(inner[3] * sy)),
            )
            wl.append(
                _Sprite(np.clip(r * of * _OD_SCALE, 0, _OD_MAX).astype(np.uint16), m, box, t, u)
            )
        wbc[z] = wl
    return _Library(
        source,
        np.median(np.array(bgs), axis=0),
        rbc,
        wbc,
        float(np.mean(areas)),
        float(np.median(diams)),
        ref,
        field_ids[ref_i],
        sum(m is None for m in maps),
    )


def _soft_ellipse(
    h: int, w: int, box: tuple[float, float, float, float], grow: float = 1.0
) -> np.ndarray:
    """(h, w) float32 in [0, 1]: the ellipse inscribed in ``box`` (px of the array, grown
    ``grow`` times about its centre), 1 inside with a ~1.5 px soft rim."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    rx = max((box[2] - box[0]) / 2 * grow, 1.0)
    ry = max((box[3] - box[1]) / 2 * grow, 1.0)
    r = np.sqrt(((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2)
    rim = 1.5 / min(rx, ry)
    return np.clip((1.0 + rim - r) / rim, 0.0, 1.0)


def _wbc_mask(shape: tuple[int, int], inner, reds) -> np.ndarray:
    """Drawn area (float32 0..1) of a white-cell sprite of ``shape`` whose cell is ``inner``
    (its labelled box, sprite px): the sprite's ellipse, less the field's red cells (``reds``,
    their labelled boxes in sprite px) outside the white cell. The ellipse cuts through the
    field's red cells around the white cell; drawn, those cut red cells were crescents and
    half cells over the slide's own red cells (dark overlaps beside the white cell), where a
    real smear has whole red cells. Left out, the slide's red cells show there instead."""
    h, w = shape
    m = _soft_ellipse(h, w, (0.0, 0.0, float(w), float(h)))
    cell = _soft_ellipse(h, w, inner)
    for r in reds:
        if r[0] < w and r[2] > 0 and r[1] < h and r[3] > 0:
            # Grown 15 %: the label box sits on the cell's edge; its rim must go too.
            m *= 1.0 - _soft_ellipse(h, w, r, 1.15) * (1.0 - cell)
    return m


def _reaches(b, ob, grow: float) -> bool:
    """Whether box ``ob`` reaches into the ellipse inscribed in box ``b`` grown ``grow`` times
    (a white-cell sprite's drawn area)."""
    cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    rx, ry = max((b[2] - b[0]) * grow / 2, 1e-6), max((b[3] - b[1]) * grow / 2, 1e-6)
    px, py = min(max(cx, ob[0]), ob[2]), min(max(cy, ob[1]), ob[3])
    return ((px - cx) / rx) ** 2 + ((py - cy) / ry) ** 2 < 1.0


# --------------------------------------------------------------------------- stain
#: Red-cell pixels of a field's stain estimate: inside 0.8 of the box's inscribed ellipse (no
#: neighbour's edge), the darker half of each cell (its rim, not the central pallor).
_STAIN_ELLIPSE = 0.8
#: A field's nucleus colour: the darkest fifth of its white cells' ellipse pixels (the detector's
#: own rule for a candidate's nucleus, :func:`pipeline.detect._has_nucleus`).
_NUCLEUS_PCT = 80.0
#: Fields whose red cells and nuclei are closer than this (degrees between OD vectors) cannot be
#: split into the two stains reliably (the map would amplify noise): left out. Measured on the
#: val split: 10.7-45 degrees, so none is left out today.
_MIN_STAIN_ANGLE = 8.0
#: Fields more than this factor paler or darker than the reference (red-cell OD) are left out:
#: a 3x OD gain would mostly amplify JPEG noise. Val split: 0.42-2.7x.
_MAX_STAIN_GAIN = 3.0


@dataclass(frozen=True)
class _Stain:
    """One field's stain in optical density (Beer-Lambert, against its own glass): ``rbc`` the
    red cells' OD vector (eosin-dominated), ``nucleus`` its white cells' nuclei (azure-eosin;
    None without a white cell)."""

    rbc: np.ndarray
    nucleus: np.ndarray | None


def _ellipse_px(od: np.ndarray, b: tuple[float, float, float, float]) -> np.ndarray | None:
    """OD pixels inside ``_STAIN_ELLIPSE`` of the inscribed ellipse of box ``b`` (px of ``od``)."""
    h, w = od.shape[:2]
    x0, y0 = max(int(round(b[0])), 0), max(int(round(b[1])), 0)
    x1, y1 = min(int(round(b[2])), w), min(int(round(b[3])), h)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return None
    yy, xx = np.mgrid[0 : y1 - y0, 0 : x1 - x0].astype(np.float32)
    ry, rx = (y1 - y0) / 2, (x1 - x0) / 2
    m = ((yy + 0.5 - ry) / ry) ** 2 + ((xx + 0.5 - rx) / rx) ** 2 < _STAIN_ELLIPSE
    px = od[y0:y1, x0:x1][m]
    return px if len(px) >= 8 else None


def _field_stain(od: np.ndarray, boxes) -> _Stain | None:
    """The stain of one field (``od`` at its own resolution, ``boxes`` its labels in px); None
    when fewer than 3 red cells can be measured."""
    rbc, nuc = [], []
    for c, b in boxes:
        px = _ellipse_px(od, b) if c in (0, 1) else None
        if px is None:
            continue
        t = px.sum(axis=1)
        if c == 1:
            rbc.append(px[t >= np.median(t)].mean(axis=0))
        else:
            nuc.append(px[t >= np.percentile(t, _NUCLEUS_PCT)].mean(axis=0))
    if len(rbc) < 3:
        return None
    r = np.median(np.array(rbc), axis=0).astype(np.float64)
    if not (np.isfinite(r).all() and r.min() > 1e-3):
        return None
    n = np.mean(np.array(nuc), axis=0).astype(np.float64) if nuc else None
    return _Stain(r, n if n is not None and np.isfinite(n).all() and n.sum() > 1e-3 else None)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return math.degrees(math.acos(float(np.clip(_unit(a) @ _unit(b), -1.0, 1.0))))


def _reference_stain(stains: list[_Stain], rng: np.random.Generator) -> int:
    """Index of the field whose stain the slide takes: a seeded pick among the half of the fields
    (with a white cell) nearest the median stain, so the slide's stain is one field's real stain,
    a typical one, and differs between seeds as between laboratories."""
    cand = [i for i, s in enumerate(stains) if s.nucleus is not None]
    if not cand:
        return int(np.argmin([abs(math.log(np.linalg.norm(s.rbc))) for s in stains]))

    def feat(s: _Stain) -> np.ndarray:
        n = s.nucleus if s.nucleus is not None else s.rbc  # (cand holds only fields with one)
        return np.concatenate(
            [s.rbc / s.rbc.sum(), n / n.sum(), [math.log(float(np.linalg.norm(s.rbc)))]]
        )

    f = np.array([feat(stains[i]) for i in cand])
    d = np.abs(f - np.median(f, axis=0)).sum(axis=1)
    near = [cand[i] for i in np.argsort(d, kind="stable")[: max(1, (len(cand) + 1) // 2)]]
    return near[int(rng.integers(len(near)))]


def _stain_map(s: _Stain, ref: _Stain) -> np.ndarray | None:
    """3x3 matrix taking OD vectors of a field stained ``s`` to the reference stain ``ref``
    (``od_ref = M @ od``); None when the field cannot be mapped reliably.

    Romanowsky stains are two dyes: red cells take eosin, nuclei azure B with eosin. A field's
    pixels are, in OD, about ``a * rbc + b * nucleus`` (+ a small rest). ``M`` takes the field's
    red-cell vector to the reference's exactly (hue and strength), its nucleus vector to the
    reference nucleus' hue at the field's own nucleus-to-red-cell strength (a dark lymphocyte
    stays darker than a pale monocyte), and the rest (the direction normal to both) scaled as
    the red cells are. A field without a white cell gets a per-channel scale fitted on its red
    cells alone.
    """
    gain = float(np.linalg.norm(ref.rbc) / np.linalg.norm(s.rbc))
    if not 1.0 / _MAX_STAIN_GAIN <= gain <= _MAX_STAIN_GAIN:
        return None
    if s.nucleus is None or ref.nucleus is None:
        return np.diag(ref.rbc / s.rbc)
    if min(_angle(s.rbc, s.nucleus), _angle(ref.rbc, ref.nucleus)) < _MIN_STAIN_ANGLE:
        return None
    src = np.stack(
        [s.rbc, s.nucleus, _unit(np.cross(s.rbc, s.nucleus)) * np.linalg.norm(s.rbc)], axis=1
    )
    n_t = _unit(ref.nucleus) * np.linalg.norm(s.nucleus) * gain
    dst = np.stack(
        [ref.rbc, n_t, _unit(np.cross(ref.rbc, ref.nucleus)) * np.linalg.norm(ref.rbc)], axis=1
    )
    m = dst @ np.linalg.inv(src)
    return m if np.isfinite(m).all() else None


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class _Layout:
    """Zone boundaries in ``s = x + u(y)`` (level-0 px), ``u(y) = kappa * ((y - yc) / half)^2``."""

    band: tuple[int, int]  # smear's y extent
    kappa: float
    s: tuple[float, float, float, float]  # thick start, thick|mono, mono|feathered, feathered end
    gaps: tuple[tuple[float, float, float, float], ...]  # (cx, cy, rx, ry)

    def zone_rho(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Zone code and red-cell areal density at level-0 points."""
        y0, y1 = self.band
        yc, half = (y0 + y1) / 2, (y1 - y0) / 2
        s = x + self.kappa * ((y - yc) / half) ** 2
        zone = np.full(np.broadcast(x, y).shape, GLASS, np.uint8)
        rho = np.zeros(zone.shape, np.float32)
        inband = (y >= y0) & (y < y1)
        s = np.broadcast_to(s, zone.shape)
        for z, (a, b) in zip(
            (THICK, MONOLAYER, FEATHERED), zip(self.s[:-1], self.s[1:]), strict=True
        ):
            m = inband & (s >= a) & (s < b)
            zone[m] = z
            r0, r1 = _RHO[z]
            rho[m] = r0 + (r1 - r0) * (s[m] - a) / max(b - a, 1e-9)
        for cx, cy, rx, ry in self.gaps:
            m = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1.0
            zone[m] = GLASS
            rho[m] = 0.0
        return zone, rho


def _layout(spec: SmearSpec, rng: np.random.Generator) -> _Layout:
    W, H = spec.width_px, spec.height_px
    margin_y = H * rng.uniform(0.06, 0.1)
    y0, y1 = int(margin_y), int(H - margin_y)
    band_frac = (y1 - y0) / H
    widths = [
        f * W / band_frac
        for f in (spec.thick_fraction, spec.monolayer_fraction, spec.feathered_fraction)
    ]
    left, right = W * rng.uniform(0.02, 0.04), W * rng.uniform(0.02, 0.04)
    room = W - left - right - sum(widths)
    kappa = max(0.0, min(0.12 * W, room * 0.9))
    s0 = left + kappa
    s = (s0, s0 + widths[0], s0 + widths[0] + widths[1], s0 + sum(widths))
    gaps = []
    for _ in range(spec.n_gaps):
        if s[2] - s[0] < 1:
            break
        r = rng.uniform(0.01, 0.03) * min(W, H)
        cy = rng.uniform(y0 + 2 * r, max(y0 + 2 * r, y1 - 2 * r))
        cx = rng.uniform(s[0], s[2]) - kappa * ((cy - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2
        gaps.append((float(cx), float(cy), float(r * rng.uniform(1.0, 1.6)), float(r)))
    return _Layout((y0, y1), float(kappa), tuple(float(v) for v in s), tuple(gaps))


# --------------------------------------------------------------------------- hashing
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(v: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser: per-point random numbers that do not depend on how the slide is cut
    # into chunks (a point rendered twice, in two chunks, gets the same cells).
    v = v ^ (v >> np.uint64(30))
    v = v * _M1
    v = v ^ (v >> np.uint64(27))
    v = v * _M2
    return v ^ (v >> np.uint64(31))


def _uniform(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# --------------------------------------------------------------------------- white cells
@dataclass(frozen=True)
class _Wbc:
    x: int  # sprite top-left, level-0 px
    y: int
    zone: int
    idx: int
    box: tuple[int, int, int, int]


def _place_wbcs(
    spec: SmearSpec, lay: _Layout, lib: _Library, rng: np.random.Generator
) -> list[_Wbc]:
    W, H = spec.width_px, spec.height_px
    px_mm2 = (spec.mpp / 1000.0) ** 2
    mono_rho = sum(_RHO[MONOLAYER]) / 2
    # Thinned Poisson: density follows red-cell density (as in blood), boosted at the edge.
    rate_max = spec.wbc_per_mm2 * max(_RHO[THICK]) / mono_rho * _WBC_ZONE_BOOST[THICK]
    rate_max = max(
        rate_max, spec.wbc_per_mm2 * max(_RHO[FEATHERED]) / mono_rho * _WBC_ZONE_BOOST[FEATHERED]
    )
    rate_max = max(rate_max, spec.wbc_per_mm2 * max(_RHO[MONOLAYER]) / mono_rho)
    n_try = rng.poisson(W * H * px_mm2 * rate_max) if spec.wbc_per_mm2 > 0 else 0
    xs, ys = rng.uniform(0, W, n_try), rng.uniform(0, H, n_try)
    zone, rho = lay.zone_rho(xs, ys)
    boost = np.array([0.0, *(_WBC_ZONE_BOOST[z] for z in (THICK, MONOLAYER, FEATHERED))])[zone]
    keep = rng.uniform(0, 1, n_try) * rate_max < spec.wbc_per_mm2 * rho / mono_rho * boost
    cell = 64
    grid: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    out: list[_Wbc] = []
    for x, y, z in zip(xs[keep], ys[keep], zone[keep], strict=True):
        z = int(z)
        idx = int(rng.integers(len(lib.wbc[z])))
        sp = lib.wbc[z][idx]
        h, w = sp.od.shape[:2]
        r = max(h, w) / 2
        if x - w < 0 or y - h < 0 or x + w > W or y + h > H:
            continue
        gx, gy = int(x // cell), int(y // cell)
        clash = any(
            (x - ox) ** 2 + (y - oy) ** 2 < (r + orad) ** 2
            for dx in range(-2, 3)
            for dy in range(-2, 3)
            for ox, oy, orad in grid.get((gx + dx, gy + dy), ())
        )
        if clash:
            continue
        grid.setdefault((gx, gy), []).append((x, y, r))
        tx, ty = int(x - w / 2), int(y - h / 2)
        b = sp.box
        out.append(_Wbc(tx, ty, z, idx, (tx + b[0], ty + b[1], tx + b[2], ty + b[3])))
    return out


# --------------------------------------------------------------------------- rendering
class _Renderer:
    def __init__(self, spec: SmearSpec, lay: _Layout, lib: _Library, wbcs: list[_Wbc]):
        self.spec, self.lay, self.lib, self.wbcs = spec, lay, lib, wbcs
        self.d = 0.9 * lib.rbc_diam_px  # lattice spacing: one cell per point just touches
        self.cells_per_rho = self.d * self.d / lib.rbc_area_px
        # Red-cell sprites in their 8 orientations in one flat list with each zone's offset, so
        # the per-cell loop does one slice-add and nothing else. Transposed and mirrored sprites
        # are stored contiguous (adding a strided view is ~5x slower); the row flip stays a
        # view (as fast). At most _RBC_SPRITES per zone bounds the copies (~10 MiB).
        self.rbc_views: list[np.ndarray] = []
        self.rbc_off = np.zeros(4, np.int64)
        self.rbc_n = np.ones(4, np.int64)
        for z in (THICK, MONOLAYER, FEATHERED):
            sprites = lib.rbc[z][:_RBC_SPRITES]
            self.rbc_off[z], self.rbc_n[z] = len(self.rbc_views), len(sprites)
            for sp in sprites:
                for o in range(8):
                    if o & 1:
                        self.rbc_views.append(self.rbc_views[-1][::-1])
                        continue
                    a = sp.od.transpose(1, 0, 2) if o & 4 else sp.od
                    self.rbc_views.append(np.ascontiguousarray(a[:, ::-1] if o & 2 else a))
        self.rbc_hw = np.array([v.shape[:2] for v in self.rbc_views], np.int64)
        # A lattice point's cell lies within its jitter (half a spacing) plus half a sprite of it.
        self.reach = int(math.ceil(0.5 * self.d + self.rbc_hw.max() / 2 + 2))
        self.wbc_boxes = np.array(
            [
                (
                    w.x,
                    w.y,
                    w.x + lib.wbc[w.zone][w.idx].od.shape[1],
                    w.y + lib.wbc[w.zone][w.idx].od.shape[0],
                )
                for w in wbcs
            ],
            np.int64,
        ).reshape(-1, 4)
        v = np.arange(_OD_MAX + 1, dtype=np.float64) / _OD_SCALE
        self.lut = [
            np.clip(np.round(lib.bg[c] * np.exp(-v)), 0, 255).astype(np.uint8) for c in range(3)
        ]
        nrng = np.random.default_rng(spec.seed ^ 0x5EED)
        # One noise strip reused at a per-chunk offset: camera noise without a per-pixel RNG.
        self.noise = np.empty((2 * _TILE, _CHUNK + 2 * _TILE, 3), np.int8)  # |noise| < 8
        for r in range(0, 2 * _TILE, 32):  # in row blocks: no float64 copy of the whole strip
            blk = nrng.standard_normal((32, _CHUNK + 2 * _TILE, 3), dtype=np.float32) * 1.2
            self.noise[r : r + 32] = blk.round()
        self.seed = np.uint64(spec.seed * 2654435761 % (1 << 63))

    def render(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the level-0 box at (x0, y0)."""
        od = np.zeros((h, w, 3), np.uint16)
        self._red_cells(od, x0, y0)
        self._white_cells(od, x0, y0)
        np.minimum(od, _OD_MAX, out=od)
        out = np.empty((h, w, 3), np.int16)
        for c in range(3):
            out[..., c] = self.lut[c].take(od[..., c])
        ny, nx = (y0 // _TILE) * 37 % _TILE, (x0 // _TILE) * 61 % (2 * _TILE)
        if h <= _TILE and w <= _CHUNK:
            out += self.noise[ny : ny + h, nx : nx + w]
        return np.clip(out, 0, 255).astype(np.uint8)

    def _red_cells(self, od: np.ndarray, x0: int, y0: int) -> None:
        h, w = od.shape[:2]
        d, R = self.d, self.reach
        i0, i1 = int((x0 - R) // d), int((x0 + w + R) // d) + 1
        j0, j1 = int((y0 - R) // d), int((y0 + h + R) // d) + 1
        ii, jj = np.meshgrid(np.arange(i0, i1), np.arange(j0, j1))
        ii, jj = ii.ravel(), jj.ravel()
        px, py = (ii + 0.5) * d, (jj + 0.5) * d
        zone, rho = self.lay.zone_rho(px, py)
        live = zone != GLASS
        if not live.any():
            return
        ii, jj, px, py, zone, rho = ii[live], jj[live], px[live], py[live], zone[live], rho[live]
        key = (
            (ii.astype(np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
            ^ (jj.astype(np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
            ^ self.seed
        )
        p = rho * self.cells_per_rho
        n = np.floor(p).astype(np.int64) + (_uniform(_mix(key)) < p - np.floor(p))
        cxs, cys, gs = [], [], []
        for k in range(int(min(n.max(), 4))):
            m = n > k
            kk = key[m] + np.uint64((k + 1) * 0xD6E8FEB86659FD93 % (1 << 64))
            h1, h2, h3 = _mix(kk), _mix(kk ^ np.uint64(1)), _mix(kk ^ np.uint64(2))
            # The first cell sits near its lattice point (cells just touch); more cells per point
            # (thick end) land anywhere in its square and pile up.
            jit = 0.25 if k == 0 else 0.5
            cxs.append(px[m] + (_uniform(h1) * 2 - 1) * jit * d - x0)
            cys.append(py[m] + (_uniform(h2) * 2 - 1) * jit * d - y0)
            zs = zone[m].astype(np.int64)
            sel = (h3 >> np.uint64(8)).astype(np.int64)
            orient = (h3 & np.uint64(7)).astype(np.int64)
            gs.append(self.rbc_off[zs] + (sel % self.rbc_n[zs]) * 8 + orient)
        if not gs:
            return
        g = np.concatenate(gs)
        sh, sw = self.rbc_hw[g, 0], self.rbc_hw[g, 1]
        tx = np.floor(np.concatenate(cxs) - sw / 2).astype(np.int64)
        ty = np.floor(np.concatenate(cys) - sh / 2).astype(np.int64)
        tx1, ty1 = tx + sw, ty + sh
        seen = (tx < w) & (ty < h) & (tx1 > 0) & (ty1 > 0)
        inside = seen & (tx >= 0) & (ty >= 0) & (tx1 <= w) & (ty1 <= h)
        views = self.rbc_views
        # Integer sums: the order cells are added in does not change a pixel.
        for gi, a, b, c, e in zip(
            g[inside].tolist(),
            ty[inside].tolist(),
            ty1[inside].tolist(),
            tx[inside].tolist(),
            tx1[inside].tolist(),
            strict=True,
        ):
            od[a:b, c:e] += views[gi]
        edge = seen & ~inside
        for gi, a, b, c, e in zip(
            g[edge].tolist(),
            ty[edge].tolist(),
            ty1[edge].tolist(),
            tx[edge].tolist(),
            tx1[edge].tolist(),
            strict=True,
        ):
            ca, cc = max(a, 0), max(c, 0)
            od[ca : min(b, h), cc : min(e, w)] += views[gi][
                ca - a : min(b, h) - a, cc - c : min(e, w) - c
            ]

    def _white_cells(self, od: np.ndarray, x0: int, y0: int) -> None:
        if not len(self.wbc_boxes):
            return
        h, w = od.shape[:2]
        b = self.wbc_boxes
        hit = np.nonzero((b[:, 0] < x0 + w) & (b[:, 2] > x0) & (b[:, 1] < y0 + h) & (b[:, 3] > y0))[
            0
        ]
        for i in hit.tolist():
            c = self.wbcs[i]
            sp = self.lib.wbc[c.zone][c.idx]
            sh, sw = sp.od.shape[:2]
            tx, ty = c.x - x0, c.y - y0
            ax0, ay0, ax1, ay1 = max(tx, 0), max(ty, 0), min(tx + sw, w), min(ty + sh, h)
            src = sp.od[ay0 - ty : ay1 - ty, ax0 - tx : ax1 - tx].astype(np.uint32)
            m = sp.mask[ay0 - ty : ay1 - ty, ax0 - tx : ax1 - tx, None].astype(np.uint32)
            dst = od[ay0:ay1, ax0:ax1].astype(np.uint32)
            od[ay0:ay1, ax0:ax1] = ((dst * (255 - m) + src * m) // 255).astype(np.uint16)


# --------------------------------------------------------------------------- writing
def _description(
    spec: SmearSpec, name: str, w0: int, h0: int, w: int, h: int, level: int
) -> str | None:
    if spec.fmt != "svs":
        return None
    d = (
        f"Aperio Image Library v12.0.15\r\n{w0}x{h0} [0,0 {w0}x{h0}] ({_TILE}x{_TILE}) "
        f"JPEG/RGB Q={spec.jpeg_quality}"
    )
    if level == 0:
        return d + f"|AppMag = 40|MPP = {spec.mpp:.6f}|Filename = {name}"
    return d + f" -> {w}x{h} D={w0 / w:g}"


def _write_level(tw, data, shape, spec: SmearSpec, name: str, level: int, w0: int, h0: int) -> None:
    h, w = shape[:2]
    ds = w0 / w
    tw.write(
        data,
        shape=shape if not isinstance(data, np.ndarray) else None,
        dtype=np.uint8 if not isinstance(data, np.ndarray) else None,
        tile=(_TILE, _TILE),
        compression="jpeg",
        compressionargs={"level": int(spec.jpeg_quality)},
        photometric="rgb",
        resolution=(1e4 / (spec.mpp * ds), 1e4 / (spec.mpp * ds)),
        resolutionunit="CENTIMETER",
        subfiletype=0 if level == 0 else 1,
        description=_description(spec, name, w0, h0, w, h, level),
        metadata=None,
        software=False,
        maxworkers=2,
        # tifffile buffers this many bytes of tiles per batch (default 512 MiB): each tile is a
        # view that keeps its 3 MiB chunk alive, so the default held ~0.6 GiB.
        buffersize=64 * _TILE * _TILE * 3,
    )


def _downsample4(src: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    import cv2

    h, w = out_shape
    out = np.empty((h, w, 3), np.uint8)
    step = 1024
    for y in range(0, h, step):
        yy = min(h, y + step)
        strip = np.ascontiguousarray(src[y * 4 : yy * 4, : w * 4])
        out[y:yy] = cv2.resize(strip, (w, yy - y), interpolation=cv2.INTER_AREA)
    return out


def build_whole_smear(
    out_dir: str | Path,
    spec: SmearSpec,
    name: str | None = None,
    data_dir: str | Path = DEFAULT_DATA_DIR,
) -> WholeSmear:
    """Write one whole-smear slide of ``spec`` into ``out_dir`` with its truth; returns it.

    ``name``: file stem (default ``smear_<seed>``; a plain name only). Memory stays bounded by
    one 256 x 4096 px chunk, the 4x proxy being on disk. Raises :class:`ConfigError` for a bad
    spec or name and :class:`WholeSmearError` when the source data cannot be used.
    """
    import time

    import cv2
    import tifffile

    t0 = time.perf_counter()
    if not isinstance(spec, SmearSpec):
        raise ConfigError(f"spec must be a SmearSpec, got {type(spec).__name__}")
    name = name if name is not None else f"smear_{spec.seed}"
    if (
        not (
            isinstance(name, str)
            and name
            and len(name) <= 100
            and all(c.isalnum() or c in "._-" for c in name)
        )
        or name[0] == "."
    ):
        raise ConfigError(f"whole-smear name must be a plain file stem, got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    source = (
        spec.source
        if spec.source != "auto"
        else sorted(SOURCE_MPP)[int(rng.integers(len(SOURCE_MPP)))]
    )
    lib = _load_library(Path(data_dir), source, spec.split, spec.mpp, rng)
    if spec.stain_gain != 1.0:
        for sprites in (*lib.rbc.values(), *lib.wbc.values()):
            for sp in sprites:
                od = sp.od.astype(np.float32) * np.float32(spec.stain_gain)
                sp.od = np.clip(od, 0, _OD_MAX).astype(np.uint16)
    lay = _layout(spec, rng)
    wbcs = _place_wbcs(spec, lay, lib, rng)
    rend = _Renderer(spec, lay, lib, wbcs)
    W, H = spec.width_px, spec.height_px
    path = out / f"{name}.{'svs' if spec.fmt == 'svs' else 'tiff'}"
    levels = [(W, H)]
    while max(levels[-1]) > _MIN_TOP_SIDE and min(levels[-1]) >= 4 * 16:
        levels.append((levels[-1][0] // 4, levels[-1][1] // 4))
    with tempfile.TemporaryDirectory(dir=out, prefix=".smear-") as tmp:
        # Level 1 goes through a raw file written band by band and read back in strips (not a
        # memory map, whose touched pages count as resident: ~1 GiB at 5 GP); level 2 is made
        # from those strips; every level below it is small.
        pw = -(-W // _TILE) * _TILE // 4
        raw = Path(tmp) / "l1.raw"

        def tiles():
            with open(raw, "wb") as fh:
                for ty in range(0, H, _TILE):
                    band = np.empty((_TILE // 4, pw, 3), np.uint8)
                    for cx in range(0, W, _CHUNK):
                        cw = min(_CHUNK, -(-(W - cx) // _TILE) * _TILE)
                        rgb = rend.render(cx, ty, cw, _TILE)
                        band[:, cx // 4 : (cx + cw) // 4] = cv2.resize(
                            rgb, (cw // 4, _TILE // 4), interpolation=cv2.INTER_AREA
                        )
                        if cx + _CHUNK >= W:
                            # Before the row's last tiles: tifffile closes this generator
                            # once it has the slide's last tile.
                            fh.write(band.tobytes())
                        for tx in range(0, cw, _TILE):
                            yield rgb[:, tx : tx + _TILE]

        l2: list[np.ndarray] = []

        def level1_tiles(lw: int, lh: int):
            for y in range(0, lh, _TILE):
                rows = min(_TILE, lh - y)
                strip = np.fromfile(raw, np.uint8, rows * pw * 3, offset=y * pw * 3)
                strip = strip.reshape(rows, pw, 3)
                if len(levels) > 2 and rows >= 4:
                    l2.append(
                        cv2.resize(
                            strip[: rows // 4 * 4, : lw // 4 * 4],
                            (lw // 4, rows // 4),
                            interpolation=cv2.INTER_AREA,
                        )
                    )
                for tx in range(0, lw, _TILE):
                    yield strip[:, tx : tx + _TILE]

        with tifffile.TiffWriter(path, bigtiff=spec.fmt == "tiff" or W * H > 2**31) as tw:
            _write_level(tw, tiles(), (H, W, 3), spec, name, 0, W, H)
            prev = None
            for lv, (lw, lh) in enumerate(levels[1:], start=1):
                if lv == 1:
                    _write_level(tw, level1_tiles(lw, lh), (lh, lw, 3), spec, name, lv, W, H)
                    continue
                arr = np.concatenate(l2)[:lh] if lv == 2 else _downsample4(prev, (lh, lw))
                l2.clear()
                _write_level(tw, arr, (lh, lw, 3), spec, name, lv, W, H)
                prev = arr
    truth = _truth(spec, name, path, source, lay, lib, wbcs)
    zones_path = out / f"{name}.zones.npz"
    labels = truth.pop("_labels")
    np.savez_compressed(zones_path, labels=labels, um_per_px=np.float64(spec.truth_um))
    (out / f"{name}.zones.png").write_bytes(render_labels_png(labels))
    truth_path = out / f"{name}.truth.json"
    truth["seconds"] = round(time.perf_counter() - t0, 3)
    truth_path.write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    return WholeSmear(
        path,
        truth_path,
        zones_path,
        "openslide:aperio" if spec.fmt == "svs" else "openslide:generic-tiff",
        len(wbcs),
        W,
        H,
        truth["zones"]["areas_mm2"],
        truth["seconds"],
    )


def truth_labels(spec: SmearSpec, lay: _Layout) -> np.ndarray:
    """Truth zone raster at ``spec.truth_um`` µm/px (pixel centres)."""
    f = spec.truth_um / spec.mpp
    gw, gh = max(1, int(round(spec.width_px / f))), max(1, int(round(spec.height_px / f)))
    xs = (np.arange(gw) + 0.5) * (spec.width_px / gw)
    ys = (np.arange(gh) + 0.5) * (spec.height_px / gh)
    out = np.empty((gh, gw), np.uint8)
    for r in range(0, gh, 256):  # in row blocks: float64 temporaries of a 5 GP raster are GBs
        out[r : r + 256], _ = lay.zone_rho(xs[None, :], ys[r : r + 256, None])
    return out


def _ring_zone(lay: _Layout, x: float, y: float, r_px: float) -> int:
    """The zone a cell centred at level-0 ``(x, y)`` has by the pipeline's rule
    (:func:`pipeline.detect.cell_zone`) applied to the true zones: the most common zone on a
    12-point ring of ``r_px``, ties to the centre's zone if it is among them, else to the first
    on the ring."""
    a = np.arange(12) * (math.pi / 6)
    zs, _ = lay.zone_rho(x + r_px * np.cos(a), y + r_px * np.sin(a))
    centre = int(lay.zone_rho(np.array([x]), np.array([y]))[0][0])
    counts = np.bincount(zs, minlength=len(ZONE_NAMES))
    top = counts.max()
    if counts[centre] == top:
        return centre
    return int(next(z for z in zs if counts[z] == top))


def _truth(spec, name, path, source, lay: _Layout, lib: _Library, wbcs: list[_Wbc]) -> dict:
    labels = truth_labels(spec, lay)
    px_mm2 = (spec.width_mm * spec.height_mm) / labels.size
    areas = {
        ZONE_NAMES[z]: round(float((labels == z).sum() * px_mm2), 4) for z in range(len(ZONE_NAMES))
    }
    y0, y1 = lay.band
    yc, half = (y0 + y1) / 2, (y1 - y0) / 2
    ys = np.linspace(y0, y1, 33)

    def curve(s):
        return [
            [round(float(s - lay.kappa * ((y - yc) / half) ** 2), 1), round(float(y), 1)]
            for y in ys
        ]

    polygons = {}
    for z, (a, b) in zip((THICK, MONOLAYER, FEATHERED), zip(lay.s[:-1], lay.s[1:]), strict=True):
        polygons[ZONE_NAMES[z]] = curve(a) + curve(b)[::-1]
    from pipeline.detect import CELL_RING_UM

    cells = []
    for c in wbcs:
        sp = lib.wbc[c.zone][c.idx]
        x0, y0, x1, y1 = c.box
        ring = _ring_zone(lay, (x0 + x1) / 2, (y0 + y1) / 2, CELL_RING_UM / spec.mpp)
        cells.append(
            {
                "box": list(c.box),
                "type": sp.cell_type,
                "zone": ZONE_NAMES[c.zone],
                "ring_zone": ZONE_NAMES[ring],
                "origin": sp.origin,
            }
        )
    return {
        "slide": path.name,
        "format": "openslide:aperio" if spec.fmt == "svs" else "openslide:generic-tiff",
        "width": spec.width_px,
        "height": spec.height_px,
        "mpp": spec.mpp,
        "source": f"TXL-PBC {source} ({spec.split} split; lugan113/TXL-PBC_Dataset, MIT)",
        "spec": asdict(spec),
        "zones": {
            "codes": {n: i for i, n in enumerate(ZONE_NAMES)},
            "areas_mm2": areas,
            "raster": f"{name}.zones.npz",
            "raster_um": spec.truth_um,
            "png": f"{name}.zones.png",
            "polygons_level0": polygons,
            "gaps_level0": [[round(v, 1) for v in g] for g in lay.gaps],
            "layout": {"band_y": list(lay.band), "kappa": lay.kappa, "s": list(lay.s)},
            "rule": "zone by s = x + kappa*((y-yc)/half)^2 between the s bounds, inside band_y; gaps are glass",
        },
        "stain": {
            "rule": "one stain per slide: every field's OD mapped to the reference field's "
            "(red-cell and nucleus OD vectors; pipeline.whole_smear._stain_map)",
            "reference_field": lib.stain_origin,
            "rbc_od": [round(float(v), 4) for v in lib.stain.rbc] if lib.stain else None,
            "nucleus_od": [round(float(v), 4) for v in lib.stain.nucleus]
            if lib.stain and lib.stain.nucleus is not None
            else None,
            "fields_left_out": lib.fields_unmapped,
        },
        "cell_zone_rule": "zone: the true zone at the box centre; ring_zone: the pipeline's rule "
        "(pipeline.detect.cell_zone: most common zone on a 12-point ring of CELL_RING_UM) "
        "applied to the true zones",
        "wbcs": cells,
        "_labels": labels,
    }
