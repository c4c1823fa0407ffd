"""Export one slide's cells as QuPath-compatible GeoJSON (detections) for review over the slide.

Each cell becomes a ``Feature`` whose geometry is its whole-cell bounding box as a closed
polygon in level-0 pixels (QuPath's image coordinates), with ``properties``:
``objectType: "detection"``, ``classification: {name: cell type, color: [r, g, b]}``,
``measurements`` (morphometry in µm/µm², QuPath-style ``"name (unit)"`` keys), plus the caption,
parsed attributes, QC flags and consistency. Open with QuPath's File > Import objects (0.4+) or drag
the file onto the slide.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from hemblip.ontology import ATTRIBUTE_NAMES
from pipeline.errors import ConfigError
from pipeline.outputs import Outputs, open_outputs
from pipeline.query import connect

__all__ = ["MEASUREMENTS", "cells_to_geojson", "export_qupath"]

#: schema column -> QuPath measurement name
MEASUREMENTS: dict[str, str] = {
    "cell_diameter_um": "Cell: Diameter µm",
    "cell_area_um2": "Cell: Area µm^2",
    "nucleus_area_um2": "Nucleus: Area µm^2",
    "nc_ratio": "Nucleus/Cytoplasm area ratio",
    "nucleus_circularity": "Nucleus: Circularity",
    "nucleus_lobes": "Nucleus: Lobes",
    "focus_score": "Focus (Laplacian variance)",
    "caption_logprob": "Caption mean log-prob",
    "cytoplasm_r": "Cytoplasm: Mean R",
    "cytoplasm_g": "Cytoplasm: Mean G",
    "cytoplasm_b": "Cytoplasm: Mean B",
    "nucleus_r": "Nucleus: Mean R",
    "nucleus_g": "Nucleus: Mean G",
    "nucleus_b": "Nucleus: Mean B",
}


def _rgb(hex_colour: str) -> list[int]:
    h = hex_colour.lstrip("#")
    return [int(h[i : i + 2], 16) for i in (0, 2, 4)]


def cells_to_geojson(cells: list[dict]) -> dict:
    """FeatureCollection of QuPath detections from cell rows (schema column names)."""
    from pipeline.report import TYPE_COLOURS

    features = []
    for c in cells:
        x0, y0, x1, y1 = (int(c[k]) for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"))
        measurements = {}
        for col, name in MEASUREMENTS.items():
            v = c.get(col)
            if v is not None and (not isinstance(v, float) or math.isfinite(v)):
                measurements[name] = float(v)
        props = {
            "objectType": "detection",
            "name": f"{c.get('cell_type') or 'cell'} #{c.get('cell_index')}",
            "measurements": measurements,
            "caption": c.get("caption"),
            "cell_id": c.get("cell_id"),
            "case": c.get("case"),
            "qc_flags": list(c.get("qc_flags") or []),
            "consistent": c.get("consistent"),
            "inconsistent_attributes": list(c.get("inconsistent_attributes") or []),
            "attributes": {a: c[a] for a in ATTRIBUTE_NAMES if c.get(a) is not None},
            "isLocked": False,
        }
        if c.get("cell_type"):
            props["classification"] = {
                "name": c["cell_type"],
                "color": _rgb(TYPE_COLOURS.get(c["cell_type"], "#495057")),
            }
        features.append(
            {
                "type": "Feature",
                "id": c.get("cell_id"),
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
                },
                "properties": props,
            }
        )
    return {"type": "FeatureCollection", "features": features}


def export_qupath(
    outputs: Outputs | str, slide: str, out: str | Path, s3_endpoint: str | None = None
) -> int:
    """Write the current cells of ``slide`` (id, unique id prefix or URI) to ``out``; returns the count.

    Raises ``ConfigError`` for an unknown/ambiguous slide or one without successfully processed cells.
    """
    if not isinstance(outputs, Outputs):
        outputs = open_outputs(outputs, s3_endpoint=s3_endpoint)
    con = connect(outputs)
    ids = sorted(
        {
            r[0]
            for r in con.execute(
                "SELECT DISTINCT slide_id FROM slides WHERE slide_id = ? OR slide_uri = ? OR starts_with(slide_id, ?)",
                [slide, slide, slide],
            ).fetchall()
        }
    )
    if not ids:
        raise ConfigError(
            f"--slide {slide}: no such slide id, id prefix or URI in {outputs.location}"
        )
    if len(ids) > 1:
        raise ConfigError(f"--slide {slide}: ambiguous, matches {len(ids)} slides")
    cols = [
        "cell_id",
        "cell_index",
        "bbox_x0",
        "bbox_y0",
        "bbox_x1",
        "bbox_y1",
        "cell_type",
        "case",
        "caption",
        "qc_flags",
        "consistent",
        "inconsistent_attributes",
        *MEASUREMENTS,
        *ATTRIBUTE_NAMES,
    ]
    cells = (
        con.sql(
            f"SELECT {', '.join(chr(34) + c + chr(34) for c in cols)} FROM current_cells "
            "WHERE slide_id = ? ORDER BY cell_index",
            params=[ids[0]],
        )
        .to_arrow_table()
        .to_pylist()
    )
    if not cells:
        status = con.execute(
            "SELECT arg_max(status, finished_at), arg_max(reason, finished_at) FROM slides "
            "WHERE slide_id = ?",
            [ids[0]],
        ).fetchone()
        raise ConfigError(
            f"--slide {slide}: no successfully processed cells (latest status {status[0]}: {status[1]})"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cells_to_geojson(cells), ensure_ascii=False), encoding="utf-8")
    return len(cells)
