"""Builder of realistic nightly-job outputs (exact CELL/SLIDE/RUN schemas) for query/report tests.

This is test DATA, not a stand-in for a component: rows have the layout the nightly job writes
(``OUTPUT/{cells,slides,runs}/run_date=YYYY-MM-DD/*.parquet``), thumbnails are real PBC cell crops
from ``../shared/data/txl_pbc`` (MIT, lugan113/TXL-PBC_Dataset; PBC images by Acevedo et al.,
attributes WBCAtt, apple2373/wbcatt) when that folder exists (else drawn cells), captions come
from ``hemblip.captions.render_caption`` when available, and the consistency columns from the
real :func:`pipeline.consistency.check_consistency`.

Composition (known, so tests can compute expected numbers from :attr:`Fixture.cells` themselves):

run 1 (2026-11-27): slide "healthy-01" ok, "aml-01" ok, "broken-01" failed
run 2 (2026-11-28): "healthy-01" skipped (already done), "cll-01" ok, "broken-01" failed again,
                    "truncated-01" failed
It also leaves staging/temporary files (``_staging/``, ``_tmp-*.parquet``, ``.partial.parquet``)
holding garbage that a reader must never open.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline import consistency
from pipeline.consistency import check_consistency
from pipeline.schema import CELL_SCHEMA, RUN_SCHEMA, SCHEMA_VERSION, SLIDE_SCHEMA

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

RUN1, RUN2 = "run-20261127-000001", "run-20261128-000001"
DATE1, DATE2 = "2026-11-27", "2026-11-28"
MODEL_VERSION = "0123456789abcdef"

# slide name -> (case, [(cell_type or None, count)])
COMPOSITION: dict[str, tuple[str, list[tuple[str | None, int]]]] = {
    "healthy-01": (
        "healthy",
        [
            ("neutrophil", 12),
            ("lymphocyte", 8),
            ("monocyte", 4),
            ("eosinophil", 3),
            ("basophil", 1),
            (None, 2),
        ],
    ),
    "aml-01": ("AML", [("myeloblast", 10), ("neutrophil", 6), ("lymphocyte", 3), ("monocyte", 3)]),
    "cll-01": ("CLL", [("lymphocyte", 20), ("atypical lymphocyte", 4), ("neutrophil", 4)]),
}

# plausible morphometry per type: diameter µm (mean, sd), N:C ratio (mean, sd), lobes
_MORPH = {
    "neutrophil": (12.0, 0.8, 0.6, 0.1, 3),
    "eosinophil": (13.0, 0.8, 0.5, 0.1, 2),
    "basophil": (11.0, 0.7, 0.9, 0.1, 1),
    "lymphocyte": (8.5, 0.7, 2.5, 0.4, 1),
    "monocyte": (15.5, 1.2, 0.9, 0.2, 1),
    "myeloblast": (15.0, 1.5, 3.0, 0.5, 1),
    "atypical lymphocyte": (13.5, 1.5, 1.2, 0.3, 1),
    None: (11.0, 2.0, 1.0, 0.3, 1),
}
_LEUKEMIC = {
    "leukemic_cell_size": "large",
    "nuclear_chromatin": "open",
    "nuclear_shape": "regular",
    "nucleolus": "prominent",
    "cytoplasm": "scanty",
    "cytoplasmic_basophilia": "moderate",
    "cytoplasmic_vacuoles": "absent",
}
_WBCATT_ATTRS = (
    "cell_size",
    "cell_shape",
    "nucleus_shape",
    "nuclear_cytoplasmic_ratio",
    "chromatin_density",
    "cytoplasm_vacuole",
    "cytoplasm_texture",
    "cytoplasm_colour",
    "granule_type",
    "granule_colour",
    "granularity",
)
# type whose real PBC crops stand in for the image of a type PBC does not contain
_IMAGE_SOURCE = {"myeloblast": "Monocyte", "atypical lymphocyte": "Lymphocyte", None: "Neutrophil"}


@dataclass
class Fixture:
    root: Path
    cells: list[dict]  # every cell row written (thumbnail bytes included)
    slides: list[dict]
    runs: list[dict]
    slide_ids: dict[str, str] = field(default_factory=dict)  # slide name -> slide_id
    real_thumbnails: bool = False


def _sha(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


def _jpeg(rgb: np.ndarray, px: int = 224) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).resize((px, px), Image.BILINEAR).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _pbc_cells(limit_per_label: int) -> dict[str, list[tuple[bytes, dict]]]:
    """label -> [(thumbnail jpeg, WBCAtt attributes)] from real PBC images, deterministic order."""
    out: dict[str, list[tuple[bytes, dict]]] = {}
    path = SHARED / "txl_pbc" / "pbc_wbcatt.csv"
    if not path.is_file():
        return out
    with open(path, newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: r["image"])
    for r in rows:
        if not r["wbc_xmin"] or len(out.get(r["label"], [])) >= limit_per_label:
            continue
        img = np.asarray(
            Image.open(SHARED / "txl_pbc" / r["image"].replace("TXL_PBC/", "", 1)).convert("RGB")
        )
        x0, y0, x1, y1 = (float(r[k]) for k in ("wbc_xmin", "wbc_ymin", "wbc_xmax", "wbc_ymax"))
        side = max(x1 - x0, y1 - y0) * 1.4
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        left, top = int(cx - side / 2), int(cy - side / 2)
        canvas = np.full((int(side), int(side), 3), 255, np.uint8)
        h, w = img.shape[:2]
        sx0, sy0 = max(left, 0), max(top, 0)
        sx1, sy1 = min(left + int(side), w), min(top + int(side), h)
        canvas[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = img[sy0:sy1, sx0:sx1]
        out.setdefault(r["label"], []).append((_jpeg(canvas), {a: r[a] for a in _WBCATT_ATTRS}))
    return out


def _drawn_cell(rng: np.random.Generator, diameter_px: int) -> bytes:
    img = Image.new("RGB", (224, 224), (236, 226, 232))
    d = ImageDraw.Draw(img)
    r = diameter_px // 2
    d.ellipse((112 - r, 112 - r, 112 + r, 112 + r), fill=(200, 170, 210))
    rn = int(r * rng.uniform(0.4, 0.7))
    d.ellipse((112 - rn, 112 - rn, 112 + rn, 112 + rn), fill=(90, 40, 130))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _caption(cell_type: str | None, case: str, attributes: dict) -> str:
    try:
        from hemblip.captions import render_caption
    except ImportError:  # captions module not importable: a plain sentence in the same spirit
        said = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in attributes.items() if v)
        return f"A {cell_type or 'white blood cell'} ({case}) with {said}."
    return render_caption(cell_type, case, {k: v for k, v in attributes.items() if v is not None})


def _slide_row(
    name: str,
    run_id: str,
    status: str,
    reason: str | None,
    cells: int,
    finished: datetime,
    width: int = 40000,
    height: int = 30000,
) -> dict:
    uri = f"s3://smears/archive/{name}.svs"
    ok = status == "ok"
    return {
        "slide_id": _sha(uri, "etag-" + name, 123456789),
        "slide_uri": uri,
        "slide_etag": "etag-" + name,
        "slide_bytes": 123456789,
        "status": status,
        "reason": reason,
        "cell_count": cells,
        "mpp": 0.25 if ok else None,
        "mpp_source": "metadata" if ok else None,
        "width": width if ok else None,
        "height": height if ok else None,
        "bytes_read": 50_000_000 if ok else 1024,
        "stage_seconds": 2.5,
        "detect_seconds": 30.0 if ok else 0.1,
        "caption_seconds": 4.0 if ok else 0.0,
        "run_id": run_id,
        "model_version": MODEL_VERSION,
        "finished_at": finished,
    }


def _cells_for(
    name: str, run_id: str, rng: np.random.Generator, pbc: dict, extra: int = 0
) -> list[dict]:
    case, comp = COMPOSITION.get(name, ("healthy", [("neutrophil", 0)]))
    if extra:
        types = [
            t
            for t in (
                "neutrophil",
                "lymphocyte",
                "monocyte",
                "eosinophil",
                "basophil",
                "myeloblast",
            )
        ]
        weights = np.array([55, 30, 7, 4, 1, 3], float)
        picks = rng.choice(len(types), size=extra, p=weights / weights.sum())
        comp = [(types[i], int((picks == i).sum())) for i in range(len(types))]
    slide = _slide_row(name, run_id, "ok", None, 0, datetime.now(UTC))
    mpp, width, height = slide["mpp"], slide["width"], slide["height"]
    rows: list[dict] = []
    used: dict[str, int] = {}
    for cell_type, count in comp:
        for _ in range(count):
            dm, dsd, ncm, ncsd, lobes = _MORPH[cell_type]
            diameter = float(max(5.0, rng.normal(dm, dsd)))
            nc = float(max(0.1, rng.normal(ncm, ncsd)))
            cx, cy = float(rng.uniform(500, width - 500)), float(rng.uniform(500, height - 500))
            i = len(rows)
            flags = []
            if i % 7 == 3:
                flags.append("out_of_focus")
            if i % 11 == 5:
                flags.append("clumped")
            if i % 13 == 0 and i:
                flags.append("slide_edge")
                cx = 30.0
            label = (
                _IMAGE_SOURCE[cell_type] if cell_type in _IMAGE_SOURCE else cell_type.capitalize()
            )
            pool = pbc.get(label, [])
            if pool:
                thumb, wbcatt = pool[used.get(label, 0) % len(pool)]
                used[label] = used.get(label, 0) + 1
            else:
                thumb, wbcatt = _drawn_cell(rng, int(diameter * 224 / 36)), {}
            attrs = {a: None for a in CELL_SCHEMA.names if a in _WBCATT_ATTRS or a in _LEUKEMIC}
            if cell_type in ("myeloblast",):
                attrs.update(_LEUKEMIC)
            elif cell_type is not None:
                attrs.update({k: v or None for k, v in wbcatt.items()})
            shape = attrs.get("nucleus_shape")
            if shape == "segmented-bilobed":
                lobes = 2
            elif shape == "segmented-multilobed":
                lobes = int(rng.integers(3, 5))
            elif shape and shape.startswith("unsegmented-"):
                lobes = 1
            size = attrs.get("cell_size")  # keep the measured size mostly in line with the caption
            big_min, small_max = (
                consistency.CELL_SIZE_BIG_MIN_UM,
                consistency.CELL_SIZE_SMALL_MAX_UM,
            )
            if size in ("big", "small") and rng.random() < 0.9:
                diameter = float(
                    rng.uniform(max(12.5, big_min + 0.3), max(16.0, big_min + 3))
                    if size == "big"
                    else rng.uniform(8.0, min(11.5, small_max - 0.3))
                )
            if i % 9 == 4 and size in (
                "big",
                "small",
            ):  # some captions contradict the measured size
                diameter = big_min - 2.0 if size == "big" else small_max + 2.0
            cell_type_out = cell_type
            r_px = diameter / mpp / 2
            row = {
                "cell_id": _sha(slide["slide_id"], round(cx), round(cy)),
                "slide_id": slide["slide_id"],
                "slide_uri": slide["slide_uri"],
                "slide_etag": slide["slide_etag"],
                "source": slide["slide_uri"],
                "cell_index": i,
                "bbox_x0": int(max(0, cx - r_px)),
                "bbox_y0": int(cy - r_px),
                "bbox_x1": int(cx + r_px),
                "bbox_y1": int(cy + r_px),
                "centroid_x": cx,
                "centroid_y": cy,
                "mpp": mpp,
                "mpp_source": "metadata",
                "crop_size_um": 36.0,
                "cell_area_um2": float(np.pi * diameter**2 / 4),
                "nucleus_area_um2": float(np.pi * diameter**2 / 4 * nc / (1 + nc)),
                "cell_diameter_um": diameter,
                "nc_ratio": nc,
                "nucleus_circularity": float(
                    rng.uniform(0.3, 0.6) if lobes > 1 else rng.uniform(0.75, 0.95)
                ),
                "nucleus_lobes": lobes,
                "cytoplasm_r": 200.0,
                "cytoplasm_g": 175.0,
                "cytoplasm_b": 210.0,
                "nucleus_r": 95.0,
                "nucleus_g": 45.0,
                "nucleus_b": 140.0,
                "focus_score": 40.0 if "out_of_focus" in flags else float(rng.uniform(200, 600)),
                "qc_flags": flags,
                "caption": _caption(cell_type_out, case, attrs),
                "caption_logprob": float(rng.uniform(-0.6, -0.05)),
                "cell_type": cell_type_out,
                "case": case,
                **attrs,
                "thumbnail_jpeg": thumb,
                "run_id": run_id,
                "model_id": "s3://models/hemblip/v1",
                "model_version": MODEL_VERSION,
                "pipeline_version": "0.1.0",
                "schema_version": SCHEMA_VERSION,
            }
            row["consistent"], row["inconsistent_attributes"] = check_consistency(row)
            rows.append(row)
    return rows


def _write(
    root: Path, table: str, date: str, rows: list[dict], schema: pa.Schema, name: str
) -> None:
    d = root / table / f"run_date={date}"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), d / f"{name}.parquet")


def build_outputs(root: Path, extra_cells: int = 0) -> Fixture:
    """Write the fixture outputs under ``root``; ``extra_cells`` adds a big slide "big-01" to run 2."""
    root = Path(root)
    rng = np.random.default_rng(1234)
    pbc = _pbc_cells(limit_per_label=40 if extra_cells else 12)
    t1 = datetime(2026, 11, 27, 2, 0, tzinfo=UTC)
    t2 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
    cells1 = _cells_for("healthy-01", RUN1, rng, pbc) + _cells_for("aml-01", RUN1, rng, pbc)
    cells2 = _cells_for("cll-01", RUN2, rng, pbc)
    if extra_cells:
        cells2 += _cells_for("big-01", RUN2, rng, pbc, extra=extra_cells)
    count = lambda name, cells: sum(c["slide_uri"].endswith(f"/{name}.svs") for c in cells)  # noqa: E731
    slides1 = [
        _slide_row(
            "healthy-01", RUN1, "ok", None, count("healthy-01", cells1), t1.replace(minute=5)
        ),
        _slide_row("aml-01", RUN1, "ok", None, count("aml-01", cells1), t1.replace(minute=9)),
        _slide_row(
            "broken-01",
            RUN1,
            "failed",
            "SlideOpenError: s3://smears/archive/broken-01.svs: not a TIFF file",
            0,
            t1.replace(minute=10),
        ),
    ]
    slides2 = [
        _slide_row(
            "healthy-01",
            RUN2,
            "skipped",
            "already processed with model 0123456789abcdef",
            0,
            t2.replace(minute=1),
        ),
        _slide_row("cll-01", RUN2, "ok", None, count("cll-01", cells2), t2.replace(minute=7)),
        _slide_row(
            "broken-01",
            RUN2,
            "failed",
            "SlideOpenError: s3://smears/archive/broken-01.svs: not a TIFF file",
            0,
            t2.replace(minute=8),
        ),
        _slide_row(
            "truncated-01",
            RUN2,
            "failed",
            "SlideReadError: s3://smears/archive/truncated-01.svs: tile 12 at level 0 cannot be decoded",
            0,
            t2.replace(minute=9),
        ),
    ]
    if extra_cells:
        slides2.append(
            _slide_row("big-01", RUN2, "ok", None, count("big-01", cells2), t2.replace(minute=30))
        )
    config = json.dumps({"input": "s3://smears/archive/", "output": str(root), "batch_size": 64})
    run = lambda rid, t0, t1_, slides, cells, listed, ok, failed, skipped: {  # noqa: E731
        "run_id": rid,
        "started_at": t0,
        "finished_at": t1_,
        "status": "ok",
        "config_json": config,
        "model_id": "s3://models/hemblip/v1",
        "model_version": MODEL_VERSION,
        "pipeline_version": "0.1.0",
        "schema_version": SCHEMA_VERSION,
        "slides_listed": listed,
        "slides_ok": ok,
        "slides_failed": failed,
        "slides_skipped": skipped,
        "cells_written": len(cells),
    }
    runs = [
        run(RUN1, t1, t1.replace(minute=12), slides1, cells1, 3, 2, 1, 0),
        run(RUN2, t2, t2.replace(minute=31), slides2, cells2, len(slides2), len(slides2) - 3, 2, 1),
    ]
    _write(root, "cells", DATE1, cells1, CELL_SCHEMA, "part-" + RUN1)
    _write(root, "cells", DATE2, cells2, CELL_SCHEMA, "part-" + RUN2)
    _write(root, "slides", DATE1, slides1, SLIDE_SCHEMA, "part-" + RUN1)
    _write(root, "slides", DATE2, slides2, SLIDE_SCHEMA, "part-" + RUN2)
    _write(root, "runs", DATE1, runs[:1], RUN_SCHEMA, "part-" + RUN1)
    _write(root, "runs", DATE2, runs[1:], RUN_SCHEMA, "part-" + RUN2)
    # uncommitted debris a reader must never open (garbage bytes would make it fail)
    for junk in (
        "_staging/cells/run_date=2026-11-29/part-x.parquet",
        "cells/run_date=2026-11-28/_tmp-upload.parquet",
        "cells/run_date=2026-11-28/.partial.parquet",
        "slides/_journal/run_date=2026-11-29/part.parquet",
    ):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"not parquet at all")
    ids = {s["slide_uri"].rsplit("/", 1)[1][:-4]: s["slide_id"] for s in slides1 + slides2}
    return Fixture(
        root=root,
        cells=cells1 + cells2,
        slides=slides1 + slides2,
        runs=runs,
        slide_ids=ids,
        real_thumbnails=bool(pbc),
    )
