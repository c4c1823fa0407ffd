"""Calibrate the thresholds of :mod:`pipeline.consistency` on real labelled cells.

    python -m pipeline calibrate-consistency --data ../shared/data [--json calib.json]

Data: the 450 PBC cells of ``txl_pbc/pbc_wbcatt.csv`` (WBCAtt expert attributes + the WBC box in
pixels of the 360x363 field image). Every cell is measured exactly as the job measures it: the
job's crop (:func:`hemblip.crops.cell_crop`: 36 µm around the box centre moved onto the nucleus,
224 px) at the PBC images' scale (:data:`hemblip.data.PBC_MPP`, the scale the end-to-end slides
carry), then ``pipeline.detection.segment_cell`` at the crop's µm/px.

Fit on WBCAtt's ``train`` split, report on ``val``+``test``. For each numeric attribute:

* split: the threshold maximising balanced accuracy of "label = upper class iff measure >= split";
* band: the lower class is flagged above max(split, its 95th percentile), the upper class below
  min(split, its 5th percentile), so ~5% of correct claims are flagged at most (on the fit split);
* reported on held-out cells: balanced accuracy at the split, rate of correct claims flagged
  (false flags), rate of wrong claims (the other value) flagged (detection).

The nucleus shape rule is calibrated by :func:`calibrate_nucleus`. The script prints the
constants to paste into ``pipeline/consistency.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def measure(data: Path) -> list[dict]:
    """One dict per usable cell: labels, split and the measurements of segment_cell on the job's crop."""
    from hemblip.crops import CROP_PX, CROP_UM, cell_crop
    from hemblip.data import PBC_MPP
    from pipeline.detection import segment_cell

    with open(data / "txl_pbc" / "pbc_wbcatt.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows = [r for r in rows if r["wbc_xmin"] not in ("", None) and int(r["n_wbc_boxes"] or 0) >= 1]
    out = []
    for r in rows:
        img = np.asarray(
            Image.open(data / "txl_pbc" / r["image"].replace("TXL_PBC/", "", 1)).convert("RGB")
        )
        x0, y0, x1, y1 = (float(r[k]) for k in ("wbc_xmin", "wbc_ymin", "wbc_xmax", "wbc_ymax"))
        crop = cell_crop(img, ((x0 + x1) / 2, (y0 + y1) / 2), PBC_MPP)
        m = segment_cell(crop, CROP_UM / CROP_PX)
        out.append(
            {
                "split": "fit" if r["wbcatt_split"] == "train" else "eval",
                "label": r["label"],
                "mpp": PBC_MPP,
                "cell_size": r["cell_size"],
                "nuclear_cytoplasmic_ratio": r["nuclear_cytoplasmic_ratio"],
                "nucleus_shape": r["nucleus_shape"],
                "cell_diameter_um": float(m.cell_diameter_um),
                "nc_ratio": float(m.nc_ratio),
                "nucleus_lobes": int(m.nucleus_lobes),
                "nucleus_circularity": float(m.nucleus_circularity),
            }
        )
    print(f"measured {len(out)} cells at {PBC_MPP} µm/px", file=sys.stderr)
    return out


def _balanced(pred_upper: np.ndarray, upper: np.ndarray) -> float:
    return float((np.mean(pred_upper[upper]) + np.mean(~pred_upper[~upper])) / 2)


def calibrate(cells: list[dict], attr: str, measure_key: str, lower: str, upper: str) -> dict:
    def arrays(split):
        sel = [
            c
            for c in cells
            if c["split"] == split
            and c[attr] in (lower, upper)
            and np.isfinite(c[measure_key])
            and c[measure_key] > 0
        ]
        return (
            np.array([c[measure_key] for c in sel], float),
            np.array([c[attr] == upper for c in sel], bool),
        )

    m, y = arrays("fit")
    scores = [(_balanced(m >= t, y), t) for t in np.unique(m)]
    best, split = max(scores)
    lo_q, hi_q = np.quantile(m[~y], 0.95), np.quantile(m[y], 0.05)
    lower_max, upper_min = max(split, lo_q), min(split, hi_q)
    me, ye = arrays("eval")
    flag_true = np.where(ye, me < upper_min, me > lower_max)  # correct claim flagged
    flag_wrong = np.where(ye, me > lower_max, me < upper_min)  # claim of the other value flagged
    return {
        "attribute": attr,
        "measure": measure_key,
        "lower_value": lower,
        "upper_value": upper,
        "split": float(split),
        "lower_flag_above": float(lower_max),
        "upper_flag_below": float(upper_min),
        "fit_cells": int(len(m)),
        "fit_balanced_accuracy": round(best, 4),
        "eval_cells": int(len(me)),
        "eval_balanced_accuracy": round(_balanced(me >= split, ye), 4),
        "eval_accuracy": round(float(np.mean((me >= split) == ye)), 4),
        "eval_false_flag_rate": round(float(np.mean(flag_true)), 4),
        "eval_wrong_claim_flag_rate": round(float(np.mean(flag_wrong)), 4),
    }


#: Fewest fit-split claims of one value for a cell type to get its own band (else the pooled one).
_MIN_TYPE_CLAIMS = 20


def calibrate_nc_by_type(cells: list[dict]) -> dict:
    """N:C bands per cell type (the caption's type), on the fit split.

    A cell type whose "low" claims measure, at the median, above the pooled low/high split is not
    compared at all: its segmentation does not measure its N:C (basophils: granules over the
    cytoplasm segment as nucleus). Widening everyone's band to fit it would stop the check from
    flagging anything. Every other type gets, per claimed value with at least
    ``_MIN_TYPE_CLAIMS`` fit cells, the band of its own 95th (low) / 5th (high) percentile, else
    the band pooled over the compared types; "high" is never flagged above the pooled split.
    """
    pooled = calibrate(cells, "nuclear_cytoplasmic_ratio", "nc_ratio", "low", "high")
    split = pooled["split"]

    def values(split_name, t, v):
        return np.array(
            [
                c["nc_ratio"]
                for c in cells
                if c["split"] == split_name
                and c["label"] == t
                and c["nuclear_cytoplasmic_ratio"] == v
                and np.isfinite(c["nc_ratio"])
                and c["nc_ratio"] > 0
            ]
        )

    types = sorted({c["label"] for c in cells})
    excluded = [
        t
        for t in types
        if len(values("fit", t, "low")) >= _MIN_TYPE_CLAIMS
        and float(np.median(values("fit", t, "low"))) > split
    ]
    kept = [c for c in cells if c["label"] not in excluded]
    base = calibrate(kept, "nuclear_cytoplasmic_ratio", "nc_ratio", "low", "high")
    bands, flagged_true, flagged_wrong, n_eval = {}, 0, 0, 0
    for t in types:
        if t in excluded:
            continue
        lo, hi = values("fit", t, "low"), values("fit", t, "high")
        low_max = (
            max(base["split"], float(np.quantile(lo, 0.95)))
            if len(lo) >= _MIN_TYPE_CLAIMS
            else base["lower_flag_above"]
        )
        high_min = (
            min(base["split"], float(np.quantile(hi, 0.05)))
            if len(hi) >= _MIN_TYPE_CLAIMS
            else base["upper_flag_below"]
        )
        bands[t.lower()] = (round(low_max, 3), round(high_min, 3))
        elo, ehi = values("eval", t, "low"), values("eval", t, "high")
        flagged_true += int(np.sum(elo > low_max) + np.sum(ehi < high_min))
        flagged_wrong += int(
            np.sum(elo < high_min) + np.sum(ehi > low_max)
        )  # the other value claimed
        n_eval += len(elo) + len(ehi)
    return {
        "attribute": "nuclear_cytoplasmic_ratio",
        "by": "cell type",
        "excluded_types": [t.lower() for t in excluded],
        "pooled_low_flag_above": round(base["lower_flag_above"], 3),
        "pooled_high_flag_below": round(base["upper_flag_below"], 3),
        "bands": bands,
        "eval_cells": n_eval,
        "eval_false_flag_rate": round(flagged_true / n_eval, 4) if n_eval else None,
        "eval_wrong_claim_flag_rate": round(flagged_wrong / n_eval, 4) if n_eval else None,
    }


def calibrate_nucleus(cells: list[dict], max_false_flags: float = 0.05) -> dict:
    """Segmented vs unsegmented nucleus from lobes (+ circularity for single-lobe nuclei).

    Lobe counting misses thin bridges, so many segmented nuclei come out as one lobe: a segmented
    claim is flagged only for a single *round* nucleus (circularity >= the smallest cut keeping
    fit false flags <= ``max_false_flags``); an unsegmented claim is flagged above the smallest
    lobe count with the same guarantee.
    """

    def sel(split, cls):
        return [
            c
            for c in cells
            if c["split"] == split and c["nucleus_segmented"] == cls and c["nucleus_lobes"] >= 1
        ]

    fit_seg, fit_uns = sel("fit", "segmented"), sel("fit", "unsegmented")
    max_lobes = next(
        k
        for k in range(1, 50)
        if np.mean([c["nucleus_lobes"] > k for c in fit_uns]) <= max_false_flags
    )
    cuts = sorted({round(c["nucleus_circularity"], 3) for c in fit_seg}) + [1.01]
    circ = next(
        t
        for t in cuts
        if np.mean([c["nucleus_lobes"] == 1 and c["nucleus_circularity"] >= t for c in fit_seg])
        <= max_false_flags
    )

    def flag_seg(c):
        return c["nucleus_lobes"] == 1 and c["nucleus_circularity"] >= circ

    def flag_uns(c):
        return c["nucleus_lobes"] > max_lobes

    ev_seg, ev_uns = sel("eval", "segmented"), sel("eval", "unsegmented")
    n = len(ev_seg) + len(ev_uns)
    pred_seg = np.array([c["nucleus_lobes"] >= 2 for c in ev_seg + ev_uns])
    truth = np.array([True] * len(ev_seg) + [False] * len(ev_uns))
    return {
        "attribute": "nucleus_shape",
        "measure": "nucleus_lobes + nucleus_circularity",
        "unsegmented_flag_above_lobes": int(max_lobes),
        "segmented_flag_single_lobe_circularity_at_least": float(circ),
        "fit_cells": len(fit_seg) + len(fit_uns),
        "eval_cells": n,
        "eval_balanced_accuracy_lobes_ge_2": round(_balanced(pred_seg, truth), 4),
        "eval_false_flag_rate": round(
            float((sum(map(flag_seg, ev_seg)) + sum(map(flag_uns, ev_uns))) / n), 4
        ),
        "eval_wrong_claim_flag_rate": round(
            float((sum(map(flag_uns, ev_seg)) + sum(map(flag_seg, ev_uns))) / n), 4
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    p.add_argument(
        "--json", type=Path, help="also write the results (and per-cell measurements) here"
    )
    args = p.parse_args(argv)
    cells = measure(args.data)
    for c in cells:  # collapse the shape values to the compared classes (irregular: not compared)
        s = c["nucleus_shape"]
        c["nucleus_segmented"] = (
            "segmented"
            if s.startswith("segmented-")
            else ("unsegmented" if s.startswith("unsegmented-") else None)
        )
    results = [
        calibrate(cells, "cell_size", "cell_diameter_um", "small", "big"),
        calibrate_nc_by_type(cells),
        calibrate_nucleus(cells),
    ]
    for r in results:
        print(json.dumps(r))
    size, nc, nuc = results
    print("# constants for pipeline/consistency.py")
    print(
        f"CELL_SIZE_SPLIT_UM = {size['split']:.2f}\nCELL_SIZE_SMALL_MAX_UM = {size['lower_flag_above']:.2f}\n"
        f"CELL_SIZE_BIG_MIN_UM = {size['upper_flag_below']:.2f}\n"
        f"NC_RATIO_LOW_MAX = {nc['pooled_low_flag_above']:.3f}\nNC_RATIO_HIGH_MIN = {nc['pooled_high_flag_below']:.3f}\n"
        f"NC_RATIO_BANDS = {nc['bands']!r}\nNC_RATIO_NOT_COMPARED = {tuple(nc['excluded_types'])!r}\n"
        f"UNSEGMENTED_MAX_LOBES = {nuc['unsegmented_flag_above_lobes']}\n"
        f"SEGMENTED_ROUND_CIRCULARITY = {nuc['segmented_flag_single_lobe_circularity_at_least']:.3f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"results": results, "cells": cells}, indent=1))
    return 0
