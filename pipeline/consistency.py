"""Caption ⇄ morphometry consistency: does what the caption claims agree with what was measured?

Compared (caption attribute -> measurement, schema column names):

* ``cell_size`` big/small -> ``cell_diameter_um``
* ``nuclear_cytoplasmic_ratio`` low/high -> ``nc_ratio``, with a band per cell type (the
  caption's): a neutrophil's "low" N:C and a monocyte's differ. Basophils are not compared: their
  granules cover the cytoplasm and segment as nucleus, so their measured N:C says nothing about
  the claim (their "low" claims measure 3.1 at the median); one band stretched to hold them would
  flag nobody else either.
* ``nucleus_shape`` segmented-* / unsegmented-* -> ``nucleus_lobes`` and, for a single lobe,
  ``nucleus_circularity`` (``irregular`` is not compared)

Each numeric comparison has a decision threshold (the split that best separates the WBCAtt
labels) and a tolerance band around it: a claim is flagged only when the measurement lies beyond
the band on the wrong side, so measurement noise on borderline cells does not raise flags.
``leukemic_cell_size`` (small/medium/large) is not compared: the shared data hold no labelled
leukemic cells to calibrate it on, and uncalibrated cut-offs would only add noise.

Thresholds were calibrated on the real PBC cells of ``../shared/data/txl_pbc/pbc_wbcatt.csv``
measured exactly as the job measures them (its 36 µm crop, at the scale its slides carry; fit on
WBCAtt's train split, accuracy on its val+test split) with::

    python -m pipeline calibrate-consistency --data ../shared/data

(accuracies in docs/readme/query-report.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import pyarrow as pa

__all__ = [
    "COMPARED_ATTRIBUTES",
    "CHECKED_COLUMNS",
    "CELL_SIZE_SPLIT_UM",
    "CELL_SIZE_SMALL_MAX_UM",
    "CELL_SIZE_BIG_MIN_UM",
    "NC_RATIO_LOW_MAX",
    "NC_RATIO_HIGH_MIN",
    "NC_RATIO_BANDS",
    "NC_RATIO_NOT_COMPARED",
    "UNSEGMENTED_MAX_LOBES",
    "SEGMENTED_ROUND_CIRCULARITY",
    "check_consistency",
    "comparable_attributes",
    "consistency_summary",
]

# Calibrated by `python -m pipeline calibrate-consistency --data ../shared/data` (see module doc).
CELL_SIZE_SPLIT_UM = 15.59  # best big/small split of cell_diameter_um
CELL_SIZE_SMALL_MAX_UM = 22.12  # "small" is flagged above this diameter
CELL_SIZE_BIG_MIN_UM = 15.15  # "big" is flagged below this diameter
# N:C (nucleus area / cytoplasm area): (low flagged above, high flagged below) per caption cell
# type; a type not listed and not excluded (or no type) uses the pooled band.
NC_RATIO_LOW_MAX = 2.377  # pooled over the compared types
NC_RATIO_HIGH_MIN = 0.281
NC_RATIO_BANDS: dict[str, tuple[float, float]] = {
    "eosinophil": (2.14, 0.281),
    "lymphocyte": (2.377, 0.253),
    "monocyte": (3.546, 0.281),
    "neutrophil": (1.635, 0.281),
}
NC_RATIO_NOT_COMPARED: tuple[str, ...] = ("basophil",)
UNSEGMENTED_MAX_LOBES = 1  # "unsegmented-*" is flagged with more lobes
SEGMENTED_ROUND_CIRCULARITY = 0.832  # "segmented-*" is flagged for ONE lobe at least this round

COMPARED_ATTRIBUTES: tuple[str, ...] = ("cell_size", "nuclear_cytoplasmic_ratio", "nucleus_shape")


def _number(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _verdicts(row: Mapping) -> dict[str, bool]:
    """attribute -> True if the claim agrees, for every attribute that can be compared."""
    out: dict[str, bool] = {}
    size = row.get("cell_size")
    diameter = _number(row.get("cell_diameter_um"))
    if diameter is not None and diameter > 0:
        if size == "small":
            out["cell_size"] = diameter <= CELL_SIZE_SMALL_MAX_UM
        elif size == "big":
            out["cell_size"] = diameter >= CELL_SIZE_BIG_MIN_UM
    ratio = row.get("nuclear_cytoplasmic_ratio")
    nc = _number(row.get("nc_ratio"))
    cell_type = row.get("cell_type")
    cell_type = cell_type.lower() if isinstance(cell_type, str) else None
    if nc is not None and nc >= 0 and cell_type not in NC_RATIO_NOT_COMPARED:
        low_max, high_min = NC_RATIO_BANDS.get(cell_type, (NC_RATIO_LOW_MAX, NC_RATIO_HIGH_MIN))
        if ratio == "low":
            out["nuclear_cytoplasmic_ratio"] = nc <= low_max
        elif ratio == "high":
            out["nuclear_cytoplasmic_ratio"] = nc >= high_min
    shape = row.get("nucleus_shape")
    lobes = _number(row.get("nucleus_lobes"))
    if lobes is not None and lobes >= 1 and isinstance(shape, str):  # 0 lobes: no nucleus found
        if shape.startswith("segmented-"):
            # lobe counting misses thin bridges (most segmented nuclei measure one lobe), so only
            # a single, round nucleus contradicts a segmented claim
            circ = _number(row.get("nucleus_circularity"))
            if lobes >= 2:
                out["nucleus_shape"] = True
            elif circ is not None:
                out["nucleus_shape"] = circ < SEGMENTED_ROUND_CIRCULARITY
        elif shape.startswith("unsegmented-"):
            out["nucleus_shape"] = lobes <= UNSEGMENTED_MAX_LOBES
    return out


def comparable_attributes(row: Mapping) -> list[str]:
    """Names of the attributes of ``row`` whose caption claim can be checked against a measurement."""
    return list(_verdicts(row))


def check_consistency(row: Mapping) -> tuple[bool | None, list[str]]:
    """Compare a cell's caption attributes with its morphometry.

    ``row`` maps schema column names (``cell_type``, ``cell_size``, ``nuclear_cytoplasmic_ratio``,
    ``nucleus_shape``, ``cell_diameter_um`` [µm], ``nc_ratio``, ``nucleus_lobes``,
    ``nucleus_circularity``) to values; missing
    keys, ``None`` and NaN mean "unknown". Returns ``(consistent, inconsistent_attributes)``:
    ``(None, [])`` when nothing is comparable, else ``(not disagreements, disagreements)`` with the
    disagreeing attribute names in :data:`COMPARED_ATTRIBUTES` order.
    """
    verdicts = _verdicts(row)
    if not verdicts:
        return None, []
    bad = [a for a in COMPARED_ATTRIBUTES if verdicts.get(a) is False]
    return not bad, bad


#: The columns :func:`check_consistency` reads (caption claims and measurements).
CHECKED_COLUMNS: tuple[str, ...] = (
    "cell_type",
    "cell_size",
    "nuclear_cytoplasmic_ratio",
    "nucleus_shape",
    "cell_diameter_um",
    "nc_ratio",
    "nucleus_lobes",
    "nucleus_circularity",
)
_NEEDED = ("slide_id", *CHECKED_COLUMNS)


def _rows(cells: pa.Table | Iterable[Mapping]) -> Iterable[Mapping]:
    if isinstance(cells, pa.Table):
        cols = [c for c in _NEEDED if c in cells.column_names]
        return cells.select(cols).to_pylist()
    return cells


def consistency_summary(cells: pa.Table | Iterable[Mapping]) -> dict[str, pa.Table]:
    """Consistency rates per slide and per attribute.

    ``cells`` holds at least the columns read by :func:`check_consistency` plus ``slide_id``.
    The verdict is recomputed from attributes and morphometry (the stored ``consistent`` column
    may come from older thresholds). Returns ``{"per_slide": ..., "per_attribute": ...}``:

    * per_slide: slide_id, cells, checked (cells with a comparable claim), inconsistent,
      inconsistent_rate (inconsistent / checked; null when nothing was checked)
    * per_attribute: attribute, comparable, inconsistent, inconsistent_rate
    """
    slides: dict[str, list[int]] = {}
    attrs = {a: [0, 0] for a in COMPARED_ATTRIBUTES}
    for row in _rows(cells):
        s = slides.setdefault(row.get("slide_id"), [0, 0, 0])
        s[0] += 1
        verdicts = _verdicts(row)
        if verdicts:
            s[1] += 1
            s[2] += not all(verdicts.values())
        for a, ok in verdicts.items():
            attrs[a][0] += 1
            attrs[a][1] += not ok
    rate = lambda bad, n: (bad / n) if n else None  # noqa: E731
    per_slide = pa.table(
        {
            "slide_id": pa.array(list(slides), pa.string()),
            "cells": pa.array([v[0] for v in slides.values()], pa.int64()),
            "checked": pa.array([v[1] for v in slides.values()], pa.int64()),
            "inconsistent": pa.array([v[2] for v in slides.values()], pa.int64()),
            "inconsistent_rate": pa.array(
                [rate(v[2], v[1]) for v in slides.values()], pa.float64()
            ),
        }
    )
    per_attribute = pa.table(
        {
            "attribute": pa.array(list(attrs), pa.string()),
            "comparable": pa.array([v[0] for v in attrs.values()], pa.int64()),
            "inconsistent": pa.array([v[1] for v in attrs.values()], pa.int64()),
            "inconsistent_rate": pa.array([rate(v[1], v[0]) for v in attrs.values()], pa.float64()),
        }
    )
    return {"per_slide": per_slide, "per_attribute": per_attribute}
