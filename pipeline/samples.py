"""Sample slides: real BCCD smear fields assembled into real pyramidal slide files.

The bundled fields (``pipeline/sample_data/bccd``, MIT, see ``ATTRIBUTION.md``) are laid out on a
grid on a white-ish background and written as JPEG-tiled pyramids (consecutive TIFF pages, one per
level, each half the previous): generic tiled TIFF and Aperio SVS, with the scale recorded so that
OpenSlide reports it. Each slide gets a JSON sidecar with its WBC boxes in level-0 px. Output is
byte-for-byte deterministic.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image

__all__ = [
    "SampleSlide",
    "build_sample_slides",
    "pyramid",
    "write_pyramid",
    "SAMPLE_DATA_DIR",
    "BCCD_MPP",
    "read_voc_boxes",
]

SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "sample_data"
_BCCD = SAMPLE_DATA_DIR / "bccd"

#: Level-0 µm/px of BCCD fields: 7.5 µm / median RBC box side (104 px over all 337 annotations).
BCCD_MPP = 0.072

_BACKGROUND = (243, 241, 245)  # glass between the fields
_GAP = 48  # px between fields and around the grid
_TILE = 256
_JPEG_QUALITY = 90
_MIN_TOP_SIDE = 512  # stop halving once the level's longer side is at most this

# (file name, writer, grid columns, grid rows); fields are consumed in name order.
_LAYOUT = (
    ("sample_1.tiff", "generic-tiff", 4, 4),
    ("sample_2.svs", "aperio", 4, 4),
    ("sample_3.tiff", "generic-tiff", 4, 4),
)


@dataclass(frozen=True)
class SampleSlide:
    """A generated slide: ``path``, its ``truth_path`` JSON sidecar, the ``format`` string that
    :func:`pipeline.slides.open_slide` reports for it, and its number of WBCs ``n_wbc``."""

    path: Path
    truth_path: Path
    format: str
    n_wbc: int


def read_voc_boxes(xml_path: Path, name: str = "WBC") -> list[tuple[int, int, int, int]]:
    """Boxes of class ``name`` in a Pascal-VOC file as ``(x0, y0, x1, y1)`` px, x1/y1 exclusive
    (VOC's are 1-based inclusive)."""
    root = ET.parse(xml_path).getroot()
    out = []
    for obj in root.iter("object"):
        if obj.findtext("name") != name:
            continue
        b = obj.find("bndbox")
        xmin, ymin, xmax, ymax = (
            int(round(float(b.findtext(k)))) for k in ("xmin", "ymin", "xmax", "ymax")
        )
        out.append((max(xmin - 1, 0), max(ymin - 1, 0), xmax, ymax))
    return out


def _fields() -> list[Path]:
    return sorted((_BCCD / "JPEGImages").glob("*.jpg"))


def _compose(fields: list[Path], cols: int, rows: int):
    first = np.asarray(Image.open(fields[0]).convert("RGB"))
    fh, fw = first.shape[:2]
    width = cols * fw + (cols + 1) * _GAP
    height = rows * fh + (rows + 1) * _GAP
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = _BACKGROUND
    boxes, placed = [], []
    for i, f in enumerate(fields):
        r, c = divmod(i, cols)
        x, y = _GAP + c * (fw + _GAP), _GAP + r * (fh + _GAP)
        img = np.asarray(Image.open(f).convert("RGB"))
        h, w = img.shape[:2]
        canvas[y : y + h, x : x + w] = img
        placed.append(
            {"image": f"bccd/JPEGImages/{f.name}", "x": x, "y": y, "width": w, "height": h}
        )
        for x0, y0, x1, y1 in read_voc_boxes(_BCCD / "Annotations" / f"{f.stem}.xml"):
            boxes.append([x + x0, y + y0, x + min(x1, w), y + min(y1, h)])
    return canvas, boxes, placed


def pyramid(level0: np.ndarray) -> list[np.ndarray]:
    levels = [level0]
    while max(levels[-1].shape[:2]) > _MIN_TOP_SIDE:
        prev = levels[-1]
        h, w = prev.shape[0] // 2, prev.shape[1] // 2
        levels.append(cv2.resize(prev, (w, h), interpolation=cv2.INTER_AREA))
    return levels


def write_pyramid(path: Path, levels: list[np.ndarray], mpp: float, vendor: str) -> None:
    h0, w0 = levels[0].shape[:2]
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for i, lvl in enumerate(levels):
            h, w = lvl.shape[:2]
            ds = w0 / w
            if vendor == "aperio":
                # OpenSlide's aperio driver keys on this prefix and parses "|MPP = " for the scale.
                desc = (
                    f"Aperio Image Library v12.0.15\r\n{w0}x{h0} [0,0 {w0}x{h0}] ({_TILE}x{_TILE}) "
                    f"JPEG/RGB Q={_JPEG_QUALITY}"
                )
                if i == 0:
                    desc += f"|AppMag = 100|MPP = {mpp:.6f}|Filename = {path.stem}"
                else:
                    desc += f" -> {w}x{h} D={ds:g}"
            else:
                desc = None
            tw.write(
                lvl,
                tile=(_TILE, _TILE),
                compression="jpeg",
                compressionargs={"level": _JPEG_QUALITY},
                photometric="rgb",
                # Generic TIFF: OpenSlide derives openslide.mpp-x from these (cm units).
                resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                description=desc,
                metadata=None,
                software=False,
            )


def build_sample_slides(out_dir: str | Path) -> list[SampleSlide]:
    """Write the sample slides and their ground-truth sidecars into ``out_dir``.

    Each slide is a ``cols x rows`` grid of 640x480 BCCD fields (level 0 = 2,800 x 2,160 px at
    :data:`BCCD_MPP` µm/px), 4 levels, 256-px JPEG tiles. The sidecar ``<name>.json`` holds
    ``width``, ``height``, ``mpp``, ``format``, ``fields`` (where each source image went) and
    ``wbc_boxes`` (``[x0, y0, x1, y1]`` level-0 px, x1/y1 exclusive).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fields = _fields()
    need = sum(c * r for _, _, c, r in _LAYOUT)
    if len(fields) < need:
        raise FileNotFoundError(f"{_BCCD}: {len(fields)} sample fields bundled, {need} needed")
    made, start = [], 0
    for name, vendor, cols, rows in _LAYOUT:
        chunk = fields[start : start + cols * rows]
        start += cols * rows
        canvas, boxes, placed = _compose(chunk, cols, rows)
        path = out / name
        write_pyramid(path, pyramid(canvas), BCCD_MPP, vendor)
        truth = {
            "slide": name,
            "format": f"openslide:{vendor}",
            "width": int(canvas.shape[1]),
            "height": int(canvas.shape[0]),
            "mpp": BCCD_MPP,
            "source": "BCCD (Shenggan/BCCD_Dataset, MIT); see pipeline/sample_data/ATTRIBUTION.md",
            "fields": placed,
            "wbc_boxes": boxes,
        }
        truth_path = out / f"{Path(name).stem}.json"
        truth_path.write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
        made.append(SampleSlide(path, truth_path, f"openslide:{vendor}", len(boxes)))
    return made
