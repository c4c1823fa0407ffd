"""Zone-limited detection on generated whole smears, scored against the generator's truth.

:func:`evaluate_smears` builds seeded whole-smear slides (:mod:`pipeline.whole_smear`: real
TXL-PBC cells, glass / thick end / monolayer / feathered edge), zones each
(:func:`pipeline.zones.zone_map`) and runs :func:`pipeline.detect.detect_slide` with
``zones=`` on it: the **detection path only** (zone map, region tasks, merge, level-0 crops and
morphometry), not the whole job (no captioning, no storage). Per slide it reports:

* **recall / precision** of the described cells: a described cell matches a truth white cell when
  its centroid lies inside the truth box (one-to-one, nearest box centre first). IoU is not
  used: each of the 12 detections seen with its centroid outside its cell's box (12 slides, 3
  seeds per source, 2026-12-03) had merged the cell with touching red cells into a box 26-62 µm
  wide (the cell 12-25 µm), IoU 0.08-0.22, centroid 8-20 µm off: an "IoU >= 0.3" rule would not
  match them either, nor would a reader. Recall: of the truth cells in the chosen zones, the
  fraction matched by a described cell; a truth cell's zone is the pipeline's own rule for a cell
  (:func:`pipeline.detect.cell_zone`: the most common zone on a 60 µm ring) applied to the
  *true* zones (``ring_zone`` in the truth), so a cell at the smear's edge that the rule puts in
  the glass is not counted as missed when the zone map agrees with the truth
  (``recall_centre_rule`` counts cells by their box centre's zone instead). Precision: of the
  described cells, the fraction matching any truth white cell (a detection of a real white cell
  whose zone the map got wrong still counts for precision, not for recall). Missed truth cells
  are split into ``missed_zone`` (the map put them outside the chosen zones: not described by
  design) and ``missed_detector`` (inside the chosen zones, not detected). ``duplicate_rows``:
  described cells not matched to a truth cell whose centroid lies in the box of a truth cell that
  another described cell matched: one cell reported twice (each also lowers precision);
* **zone-map agreement** with the truth raster (fraction of area, overall and per zone);
* **cells counted outside the chosen zones**, per zone;
* **level-0 read fraction**: 256-px level-0 tiles touched by any read ÷ the slide's tiles (a
  local slide is wrapped in a counter; the bytes a remote slide fetches are
  :mod:`bench.bench_smear`'s);
* seconds (generation, zoning, detection).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError
from pipeline.slides import Slide

__all__ = [
    "CountingSlide",
    "default_specs",
    "evaluate_smears",
    "format_table",
    "match_cells",
    "truth_zone",
]

_TILE = 256


class CountingSlide(Slide):
    """Wraps an open slide and records which 256-px level-0 tiles any read touched."""

    def __init__(self, inner: Slide):
        super().__init__(
            inner.path,
            inner.level_dimensions,
            inner.level_downsamples,
            inner.mpp if inner.mpp_source == "metadata" else None,
            inner.mpp if inner.mpp_source == "user" else None,
            inner.max_pixels,
            inner.max_decode_bytes,
        )
        self.format = inner.format
        self._inner = inner
        self.tiles0: set[tuple[int, int]] = set()
        self.px_read = [0] * inner.level_count

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        self.px_read[level] += (x1 - x0) * (y1 - y0)
        if level == 0:
            for ty in range(y0 // _TILE, (y1 - 1) // _TILE + 1):
                for tx in range(x0 // _TILE, (x1 - 1) // _TILE + 1):
                    self.tiles0.add((tx, ty))
        return self._inner._read_checked(level, x0, y0, x1, y1)

    def prefetch(self, level: int, boxes) -> None:
        self._inner.prefetch(level, boxes)

    def level0_fraction(self) -> float:
        """Level-0 tiles touched ÷ the slide's level-0 tiles."""
        w, h = self.dimensions
        return len(self.tiles0) / float(math.ceil(w / _TILE) * math.ceil(h / _TILE))


def match_cells(centroids, boxes) -> list[tuple[int, int]]:
    """One-to-one ``(pred, truth)`` pairs: a predicted centroid ``(x, y)`` matches a truth box
    ``(x0, y0, x1, y1)`` that holds it; pairs are taken nearest box centre first."""
    cand = []
    for i, (x, y) in enumerate(centroids):
        for j, (x0, y0, x1, y1) in enumerate(boxes):
            if x0 <= x < x1 and y0 <= y < y1:
                cand.append((math.hypot(x - (x0 + x1) / 2, y - (y0 + y1) / 2), i, j))
    cand.sort()
    used_p, used_t, pairs = set(), set(), []
    for _, i, j in cand:
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            pairs.append((i, j))
    return pairs


def truth_zone(cell: dict) -> str:
    """A truth white cell's zone as the pipeline defines a cell's zone: ``ring_zone`` (the
    :func:`pipeline.detect.cell_zone` ring rule on the true zones), else (truth written before
    it existed) the zone at its box centre."""
    return cell.get("ring_zone") or cell["zone"]


def default_specs(large: bool = False, per_source: int = 1):
    """The evaluated slides: four small (3 x 1.5 mm at 0.25 µm/px, 72 MP), one per TXL-PBC source,
    SVS and generic TIFF; ``large``: two 0.5 GP slides (8 x 4 mm) instead. ``per_source``: that
    many slides of each (seeds +10 each; one slide holds 40-80 monolayer white cells, so one
    cell moves a source's figure by 0.01-0.03)."""
    from pipeline.whole_smear import SmearSpec

    if isinstance(per_source, bool) or not isinstance(per_source, int) or not 1 <= per_source <= 20:
        raise ConfigError(f"--per-source must be an integer in [1, 20], got {per_source!r}")
    if per_source > 1:
        one = default_specs(large)
        return [replace(s, seed=s.seed + 10 * k) for k in range(per_source) for s in one]

    if large:
        return [
            SmearSpec(width_mm=8.0, height_mm=4.0, seed=301, source="pbc", monolayer_fraction=0.3),
            SmearSpec(
                width_mm=8.0,
                height_mm=4.0,
                seed=302,
                source="bccd",
                monolayer_fraction=0.3,
                fmt="tiff",
            ),
        ]
    return [
        SmearSpec(width_mm=3.0, height_mm=1.5, seed=401, source="pbc", monolayer_fraction=0.3),
        SmearSpec(width_mm=3.0, height_mm=1.5, seed=402, source="raabin", monolayer_fraction=0.4),
        SmearSpec(width_mm=3.0, height_mm=1.5, seed=403, source="kaggle", monolayer_fraction=0.2),
        SmearSpec(
            width_mm=3.0, height_mm=1.5, seed=404, source="bccd", monolayer_fraction=0.3, fmt="tiff"
        ),
    ]


def evaluate_one(
    path, truth_path, zones_path, select=("monolayer",), max_cells=None, seed=0
) -> dict:
    """Score zone-limited detection on one generated slide (see the module docstring)."""
    from pipeline.detect import cell_zone, detect_slide
    from pipeline.slides import open_slide
    from pipeline.zones import agreement, zone_map

    truth = json.loads(Path(truth_path).read_text(encoding="utf-8"))
    truth_labels = np.load(zones_path)["labels"]
    with open_slide(path) as inner:
        slide = CountingSlide(inner)
        t0 = time.perf_counter()
        zm = zone_map(slide)
        zone_s = time.perf_counter() - t0
        t1, cpu = time.perf_counter(), time.process_time()
        res = detect_slide(slide, zones=zm, select=select, max_cells=max_cells, seed=seed)
        detect_s, detect_cpu = time.perf_counter() - t1, time.process_time() - cpu
        frac = slide.level0_fraction()
    ag = agreement(zm.labels_on(truth_labels.shape), truth_labels)
    wbcs = truth["wbcs"]
    boxes = [tuple(w["box"]) for w in wbcs]
    pred = [(r["centroid_x"], r["centroid_y"]) for r in res.records]
    pairs = match_cells(pred, boxes)
    matched_truth = {j for _, j in pairs}
    chosen = [j for j, w in enumerate(wbcs) if truth_zone(w) in select]
    hit = [j for j in chosen if j in matched_truth]
    centre = [j for j, w in enumerate(wbcs) if w["zone"] in select]
    missed = [j for j in chosen if j not in matched_truth]
    # A miss is the zone map's when the map puts the cell outside the chosen zones: by the ring
    # rule at its box centre, or because the pipeline detected it and counted it outside (the
    # ring rule at the detection's centroid, 1-2 µm from the box centre, can differ).
    outside_pts = res.info.get("cells_outside_points") or []
    missed_zone = sum(
        cell_zone(zm, (boxes[j][0] + boxes[j][2]) / 2, (boxes[j][1] + boxes[j][3]) / 2)[
            "smear_zone"
        ]
        not in select
        or any(
            boxes[j][0] <= x < boxes[j][2] and boxes[j][1] <= y < boxes[j][3]
            for x, y, _ in outside_pts
        )
        for j in missed
    )
    n_pred = len(pred)
    duplicate_rows = count_duplicates(pred, boxes, pairs)
    return {
        "slide": Path(path).name,
        "source": truth.get("spec", {}).get("source"),
        "width": res.info["width"],
        "height": res.info["height"],
        "gigapixels": round(res.info["width"] * res.info["height"] / 1e9, 3),
        "truth_wbc_chosen_zones": len(chosen),
        "described": n_pred,
        "matched": len(hit),
        "recall": round(len(hit) / len(chosen), 4) if chosen else None,
        # The same with the cells whose box centre lies in the chosen zones (cells at a zone's
        # edge counted by where their centre is, not by the pipeline's ring rule).
        "truth_wbc_centre_in_zones": len(centre),
        "recall_centre_rule": round(sum(j in matched_truth for j in centre) / len(centre), 4)
        if centre
        else None,
        "precision": round(len(pairs) / n_pred, 4) if n_pred else None,
        "missed_zone": int(missed_zone),
        "missed_detector": len(missed) - int(missed_zone),
        "duplicate_rows": duplicate_rows,
        "zone_agreement": ag,
        "cells_outside_zones": res.info["cells_outside_zones"],
        "cells_total": res.info["cells_total"],
        "sampled": res.info["sampled"],
        "cells_total_estimated": res.info.get("cells_total_estimated", False),
        "region_tasks": res.info["region_tasks"],
        "level0_fraction_planned": round(res.info["level0_fraction_planned"], 4),
        "level0_fraction_read": round(frac, 4),
        "zone_areas_mm2": res.info["zones"]["areas_mm2"],
        "truth_areas_mm2": truth["zones"]["areas_mm2"],
        "zone_seconds": round(zone_s, 2),
        "detect_seconds": round(detect_s, 2),
        "detect_cpu_seconds": round(detect_cpu, 2),
    }


def evaluate_smears(
    specs=None,
    *,
    large: bool = False,
    select=("monolayer",),
    max_cells: int | None = None,
    out_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    per_source: int = 1,
) -> dict:
    """Generate ``specs`` (default :func:`default_specs`) in ``out_dir`` (default a temporary
    folder, removed after), evaluate each (:func:`evaluate_one`) and sum up. A slide that cannot
    be built or evaluated is recorded under ``errors`` with its reason; the others go on."""
    from pipeline.detect import _check_budget, _check_select
    from pipeline.errors import PipelineError
    from pipeline.whole_smear import DEFAULT_DATA_DIR, build_whole_smear

    specs = list(specs) if specs is not None else default_specs(large, per_source)
    select = _check_select(select)  # a bad --zones is one clear error, not one per slide
    _check_budget(max_cells, 0)
    rows, errors = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(out_dir) if out_dir is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            name = f"smear_{spec.source}_{spec.seed}"
            try:
                sm = build_whole_smear(
                    out, spec, name=name, data_dir=Path(data_dir) if data_dir else DEFAULT_DATA_DIR
                )
                row = evaluate_one(
                    sm.path, sm.truth_path, sm.zones_path, select, max_cells, spec.seed
                )
                row["generate_seconds"] = round(sm.seconds, 2)
                row["spec"] = asdict(spec)
                rows.append(row)
            except (PipelineError, OSError, ValueError) as exc:
                errors.append({"slide": name, "error": f"{type(exc).__name__}: {exc}"})
    totals = _totals(rows)
    by_source: dict[str, list[dict]] = {}
    for r in rows:
        by_source.setdefault(r["spec"]["source"], []).append(r)
    return {
        "per_source": {src: _totals(rs) for src, rs in sorted(by_source.items())},
        "path": "detection (pipeline.detect.detect_slide with zones), not the whole job",
        "select": list(select),
        "max_cells": max_cells,
        "slides": rows,
        "errors": errors,
        "totals": totals,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def count_duplicates(pred, boxes, pairs) -> int:
    """Described cells (``pred`` centroids) left unmatched by ``pairs`` (:func:`match_cells`)
    whose centroid lies in the box of a truth cell another described cell matched: one cell
    reported twice."""
    used = {i for i, _ in pairs}
    taken = [boxes[j] for _, j in pairs]
    return sum(
        1
        for i, (x, y) in enumerate(pred)
        if i not in used and any(b[0] <= x < b[2] and b[1] <= y < b[3] for b in taken)
    )


def _totals(rows: list[dict]) -> dict:
    chosen = sum(r["truth_wbc_chosen_zones"] for r in rows)
    matched = sum(r["matched"] for r in rows)
    described = sum(r["described"] for r in rows)
    prec_hits = sum(round((r["precision"] or 0) * r["described"]) for r in rows)
    outside: dict[str, int] = {}
    for r in rows:
        for z, n in r["cells_outside_zones"].items():
            outside[z] = outside.get(z, 0) + n
    return {
        "recall": round(matched / chosen, 4) if chosen else None,
        "precision": round(prec_hits / described, 4) if described else None,
        "truth_wbc_chosen_zones": chosen,
        "described": described,
        "missed_zone": sum(r["missed_zone"] for r in rows),
        "missed_detector": sum(r["missed_detector"] for r in rows),
        "duplicate_rows": sum(r.get("duplicate_rows", 0) for r in rows),
        "zone_agreement_min": min((r["zone_agreement"]["overall"] for r in rows), default=None),
        "cells_outside_zones": outside,
        "level0_fraction_read_mean": round(
            float(np.mean([r["level0_fraction_read"] for r in rows])), 4
        )
        if rows
        else None,
    }


def format_table(res: dict) -> str:
    """The evaluation as a plain-text table plus totals."""
    head = (
        "slide",
        "GP",
        "truth",
        "desc",
        "recall",
        "prec",
        "miss z/d",
        "zone agr",
        "outside",
        "L0 read",
        "det s",
    )
    lines = [head]
    for r in res["slides"]:
        out = ",".join(f"{z[:5]}={n}" for z, n in r["cells_outside_zones"].items())
        lines.append(
            (
                r["slide"],
                f"{r['gigapixels']:.2f}",
                str(r["truth_wbc_chosen_zones"]),
                str(r["described"]),
                _f(r["recall"]),
                _f(r["precision"]),
                f"{r['missed_zone']}/{r['missed_detector']}",
                _f(r["zone_agreement"]["overall"]),
                out,
                _f(r["level0_fraction_read"]),
                f"{r['detect_seconds']:.1f}",
            )
        )
    widths = [max(len(str(t[i])) for t in lines) for i in range(len(head))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(t, widths)) for t in lines]
    t = res["totals"]
    text.append(
        f"all: recall {_f(t['recall'])} (goal >= 0.97), precision {_f(t['precision'])} (goal >= 0.95) "
        f"over {t['truth_wbc_chosen_zones']} truth white cells in {', '.join(res['select'])}; "
        f"missed {t['missed_zone']} by zone map, {t['missed_detector']} by detector; "
        f"{t['duplicate_rows']} cells reported twice; zone agreement min {_f(t['zone_agreement_min'])} (goal >= 0.90); outside chosen zones "
        f"{t['cells_outside_zones']}; level-0 tiles read {_f(t['level0_fraction_read_mean'])} of the slide"
    )
    for src, st in (res.get("per_source") or {}).items():
        text.append(
            f"  {src}: recall {_f(st['recall'])}, precision {_f(st['precision'])} over "
            f"{st['truth_wbc_chosen_zones']} truth white cells; missed {st['missed_zone']} by zone "
            f"map, {st['missed_detector']} by detector; {st.get('duplicate_rows', 0)} reported twice"
        )
    for e in res["errors"]:
        text.append(f"error: {e['slide']}: {e['error']}")
    text.append(f"path: {res['path']}; {res['seconds']:.0f} s")
    return "\n".join(text)


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def with_seed(spec, seed: int):
    """``spec`` with another seed (helper for callers that vary seeds)."""
    return replace(spec, seed=seed)
