"""Detection throughput against a naive full-resolution read, on generated slides.

For each slide, in one process and one run: full-resolution (level-0) megapixels per CPU-second
(= per core) of ``detect_slide`` (read the detection level + detect + read level-0 crops +
morphometry), and of a naive read of every level-0 pixel (``read`` over all 512-px level-0
tiles, which is what "decode the whole slide" costs at the least), and their ratio (goal ≥ 4).

Two slides, both real BCCD pixels at 0.072 µm/px written as JPEG-tiled pyramidal TIFF:

* ``dense``: the sample slide ``sample_1.tiff`` (every 640x480 field holds a WBC: ~1 WBC / 0.36 MP);
* ``smear``: 12 x 12 fields of WBC-free quarter fields (red cells only) with 3 whole WBC fields,
  one WBC per 48 fields, about the 1:700 WBC:RBC ratio of normal blood (BCCD fields hold ~15
  red cells each).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import samples as _samples
from pipeline.detect import DetectConfig, detect_slide
from pipeline.slides import open_slide

_NAIVE_TILE = 512
_GRID = 12  # smear slide: _GRID x _GRID blocks of 640 x 480
_WBC_BLOCKS = ((2, 3), (6, 8), (9, 1))  # (row, col) of the whole WBC fields


def _smear_slide(path: Path, grid: int = _GRID) -> None:
    """A smear at normal white-cell density: ``grid`` x ``grid`` blocks of 640 x 480 px (BCCD
    fields' WBC-free quarters) with whole WBC fields at ``_WBC_BLOCKS``; a 4x pyramid."""
    fields = sorted((_samples.SAMPLE_DATA_DIR / "bccd" / "JPEGImages").glob("*.jpg"))
    quarters = []  # 320 x 240 pieces clear of any WBC box (16 px margin)
    for f in fields:
        rgb = np.asarray(Image.open(f).convert("RGB"))
        boxes = _samples.read_voc_boxes(
            _samples.SAMPLE_DATA_DIR / "bccd" / "Annotations" / f"{f.stem}.xml"
        )
        for qy in (0, 240):
            for qx in (0, 320):
                if all(
                    x1 + 16 <= qx or x0 - 16 >= qx + 320 or y1 + 16 <= qy or y0 - 16 >= qy + 240
                    for x0, y0, x1, y1 in boxes
                ):
                    quarters.append(rgb[qy : qy + 240, qx : qx + 320])
    if not quarters:
        raise RuntimeError("no WBC-free quarter fields in the bundled sample data")
    canvas = np.empty((grid * 480, grid * 640, 3), np.uint8)
    k = 0
    for by in range(grid * 2):
        for bx in range(grid * 2):
            canvas[by * 240 : by * 240 + 240, bx * 320 : bx * 320 + 320] = quarters[
                (k * 7) % len(quarters)
            ]
            k += 1
    for i, (r, c) in enumerate(_WBC_BLOCKS):
        canvas[r * 480 : r * 480 + 480, c * 640 : c * 640 + 640] = np.asarray(
            Image.open(fields[i]).convert("RGB")
        )
    _samples.write_pyramid(path, _samples.pyramid(canvas), _samples.BCCD_MPP, "generic-tiff")


def _naive(path: Path) -> tuple[float, float]:
    """(level-0 MP, CPU seconds) of reading every level-0 pixel once."""
    t = time.process_time()
    n = 0
    with open_slide(path) as s:
        w, h = s.dimensions
        for y in range(0, h, _NAIVE_TILE):
            for x in range(0, w, _NAIVE_TILE):
                a = s.read(0, (x, y, min(x + _NAIVE_TILE, w), min(y + _NAIVE_TILE, h)))
                n += a.shape[0] * a.shape[1]
    return n / 1e6, time.process_time() - t


def _detect(path: Path) -> tuple[float, float, int, int]:
    """(level-0 MP, CPU seconds, cells, detection level) of detect_slide."""
    t = time.process_time()
    res = detect_slide(path, DetectConfig())
    dt = time.process_time() - t
    return (
        res.info["width"] * res.info["height"] / 1e6,
        dt,
        len(res.records),
        res.info["detect_level"],
    )


def run() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        dense = _samples.build_sample_slides(d)[0].path
        smear = d / "smear.tiff"
        _smear_slide(smear)
        _detect(dense)  # warm-up: imports, the verifier's weights, OpenSlide's first open
        for label, path in (("dense", dense), ("smear", smear)):
            mp, naive_s = _naive(path)
            _, det_s, cells, level = _detect(path)
            det_rate, naive_rate = mp / det_s, mp / naive_s
            detail = f"{mp:.1f} MP level 0, {cells} cells, detected on level {level}"
            rows += [
                {
                    "name": f"detect_{label}",
                    "value": det_rate,
                    "unit": "MP/core-s",
                    "goal": "",
                    "detail": detail,
                },
                {
                    "name": f"naive_read_{label}",
                    "value": naive_rate,
                    "unit": "MP/core-s",
                    "goal": "",
                    "detail": detail,
                },
                {
                    "name": f"detect_vs_naive_{label}",
                    "value": det_rate / naive_rate,
                    "unit": "x",
                    "goal": ">= 4",
                    "detail": detail,
                },
            ]
            print(f"{label}: {detail}; detect {det_s:.2f} CPU-s, naive read {naive_s:.2f} CPU-s")
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
