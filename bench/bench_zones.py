"""Zone maps against the whole-smear generator's truth: agreement per zone, seconds, selection.

Generates whole-smear slides (:mod:`pipeline.whole_smear`, several seeds and TXL-PBC sources),
zones them (:func:`pipeline.zones.zone_map`) and reports area agreement with the truth raster
(goal >= 0.90, overall and per zone), generation and zoning seconds, the peak RSS of each (each
runs in its own process, so the figure is that step's alone), and the fraction of level-0 area
that ``region_boxes(("monolayer",))`` selects (the share a job restricted to the monolayer
reads; with the default 4096-px region tiles and with 1024-px ones). ``BENCH_ZONES_LARGE=1``
adds a 5 GP slide (25 x 12.5 mm at 0.25 µm/px) at 10 % and at 40 % monolayer (minutes each;
~0.5 GB of disk each, removed after use). Each slide also reports its calibrated red-cell OD
(``cell_od``) and the monolayer white cells the map loses: truth cells whose zone by the
pipeline's ring rule on the true zones (``ring_zone``) is the monolayer and whose zone on the map
(:func:`pipeline.detect.cell_zone`) is not.

``BENCH_ZONES_SETS=1`` instead runs the calibration study's two sets (~5 min): 28 **tuning**
slides (3 x 1.5 mm, 72 MP; per source the ``eval-smear`` default layout at seeds 401-424, 10 %
monolayer / 35 % thick, 40 % / 10 %, a stain x0.6 or x1.5 as dark, and 2 x 1 mm at 0.2 or
0.5 µm/px) on which the calibration and thresholds were chosen, and 20 **held-back** slides
(seeds 431-478: the default layout, 15 % / 25 %, 35 % / 10 % with 20 % feathered edge, a stain
x1.4 or x0.7, 0.5 or 0.2 µm/px) never looked at while choosing. It reports agreement per
source and per set (mean and worst slide), per zone, the monolayer cells lost, and the
calibration's stability: the red-cell OD of each default-layout tuning slide regenerated with
no white cells (goal within 2 %) and with 230 / 256 / 300 windows.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import numpy as np

from pipeline.whole_smear import SmearSpec, build_whole_smear, smear_gigapixels
from pipeline.zones import ZONE_NAMES, ZoneSettings, agreement, zone_map_from_path

_CASES = [
    SmearSpec(width_mm=8.0, height_mm=4.0, seed=101, source="pbc", monolayer_fraction=0.3),
    SmearSpec(width_mm=4.0, height_mm=2.0, seed=102, source="raabin", monolayer_fraction=0.4),
    SmearSpec(
        width_mm=4.0,
        height_mm=2.0,
        seed=103,
        source="kaggle",
        monolayer_fraction=0.1,
        thick_fraction=0.35,
    ),
    SmearSpec(
        width_mm=4.0, height_mm=2.0, seed=104, source="bccd", monolayer_fraction=0.3, fmt="tiff"
    ),
]
_LARGE = [
    SmearSpec(
        width_mm=25.0,
        height_mm=12.5,
        seed=201,
        source="bccd",
        monolayer_fraction=f,
        thick_fraction=0.1,
    )
    for f in (0.1, 0.4)
]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _generate(out: str, spec: SmearSpec, name: str) -> tuple[object, float, float]:
    c0 = time.process_time()
    sm = build_whole_smear(out, spec, name=name)
    return sm, time.process_time() - c0, _peak_mib()


def _monolayer_lost(zm, truth_json: str) -> tuple[int, int]:
    """(lost, total): truth white cells whose ring-rule zone on the true zones is the monolayer,
    and of them those the map puts in another zone (the pipeline's own rule for a cell)."""
    import json
    from pathlib import Path

    from pipeline.detect import cell_zone

    cells = [
        w
        for w in json.loads(Path(truth_json).read_text(encoding="utf-8"))["wbcs"]
        if (w.get("ring_zone") or w["zone"]) == "monolayer"
    ]
    lost = sum(
        cell_zone(zm, (w["box"][0] + w["box"][2]) / 2, (w["box"][1] + w["box"][3]) / 2)[
            "smear_zone"
        ]
        != "monolayer"
        for w in cells
    )
    return lost, len(cells)


def _zone(path: str, truth_path: str, truth_json: str | None = None) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    zm = zone_map_from_path(path)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    truth = np.load(truth_path)["labels"]
    lost, mono_cells = _monolayer_lost(zm, truth_json) if truth_json else (0, 0)
    return {
        "cell_od": zm.cell_od,
        "lost": lost,
        "mono_cells": mono_cells,
        "agreement": agreement(zm.labels_on(truth.shape), truth),
        "wall": wall,
        "cpu": cpu,
        "peak_mib": _peak_mib(),
        "selected": zm.selected_fraction(("monolayer",)),
        "selected_1024": zm.selected_fraction(("monolayer",), 1024),
        "areas": zm.areas_mm2(),
    }


def _in_child(fn, *args):
    # A fresh process per step: ru_maxrss is then that step's own peak.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as ex:
        return ex.submit(fn, *args).result()


def run() -> list[dict]:
    if os.environ.get("BENCH_ZONES_SETS") == "1":
        return run_sets()
    cases = _CASES + (_LARGE if os.environ.get("BENCH_ZONES_LARGE") == "1" else [])
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_ZONES_DIR")) as tmp:
        for spec in cases:
            label = (
                f"{spec.source}_{smear_gigapixels(spec):.2f}GP_mono{spec.monolayer_fraction:.0%}"
            )
            sm, gen_cpu, gen_mib = _in_child(_generate, tmp, spec, f"s{spec.seed}")
            z = _in_child(_zone, str(sm.path), str(sm.zones_path), str(sm.truth_path))
            ag = z["agreement"]
            size_mib = sm.path.stat().st_size / 2**20
            detail = (
                f"{sm.width}x{sm.height} px, {size_mib:.0f} MiB, {sm.n_wbc} WBC, "
                f"per zone {ag['per_zone']}, truth areas {sm.areas_mm2}, map areas {z['areas']}"
            )
            print(
                f"{label}: agreement {ag['overall']:.3f} {ag['per_zone']}; generate "
                f"{sm.seconds:.1f} s (cpu {gen_cpu:.1f} s, peak {gen_mib:.0f} MiB), zone "
                f"{z['wall']:.2f} s (cpu {z['cpu']:.2f} s, peak {z['peak_mib']:.0f} MiB), "
                f"monolayer tiles {z['selected']:.3f} of level 0 "
                f"({z['selected_1024']:.3f} in 1024-px tiles), red-cell OD {z['cell_od']:.3f}, "
                f"monolayer cells lost {z['lost']}/{z['mono_cells']}",
                flush=True,
            )
            per = [
                (f"zone_agreement_{label}", ag["overall"], "area", ">= 0.90"),
                *(
                    (f"zone_agreement_{zn}_{label}", v, "area", ">= 0.90")
                    for zn, v in ag["per_zone"].items()
                    if v is not None
                ),
                (f"generate_s_{label}", sm.seconds, "s", ""),
                (f"generate_cpu_s_{label}", gen_cpu, "s", ""),
                (f"generate_peak_rss_{label}", gen_mib, "MiB", ""),
                (f"zone_s_{label}", z["wall"], "s", ""),
                (f"zone_peak_rss_{label}", z["peak_mib"], "MiB", "<= 2048"),
                (f"monolayer_selected_{label}", z["selected"], "of level 0", ""),
                (f"monolayer_selected_1024px_{label}", z["selected_1024"], "of level 0", ""),
                (f"cell_od_{label}", z["cell_od"], "OD", ""),
                (f"monolayer_cells_lost_{label}", z["lost"], f"of {z['mono_cells']}", ""),
            ]
            rows += [
                {"name": n, "value": v, "unit": u, "goal": g, "detail": detail}
                for n, v, u, g in per
            ]
            for p in sm.path.parent.glob(f"s{spec.seed}.*"):
                p.unlink()
    return rows


# ------------------------------------------------------------------- calibration study sets
_SOURCES = ("pbc", "raabin", "kaggle", "bccd")
_MONO = {"pbc": 0.3, "raabin": 0.4, "kaggle": 0.2, "bccd": 0.3}  # eval-smear's default layouts


def _spec(src: str, seed: int, **kw) -> SmearSpec:
    kw.setdefault("monolayer_fraction", _MONO[src])
    return SmearSpec(
        **{"width_mm": 3.0, "height_mm": 1.5, "seed": seed, "source": src, **kw},
    )


def study_sets() -> dict[str, list[tuple[SmearSpec, float]]]:
    """The tuning and held-back slides as ``(spec, stain gain)``."""
    tuning, held = [], []
    for base in (400, 410, 420):
        tuning += [(_spec(s, base + 1 + i), 1.0) for i, s in enumerate(_SOURCES)]
    for i, s in enumerate(_SOURCES):
        even = i % 2 == 0
        tuning += [
            (_spec(s, 405 + i, monolayer_fraction=0.1, thick_fraction=0.35), 1.0),
            (
                _spec(
                    s, 415 + i, monolayer_fraction=0.4, thick_fraction=0.1, feathered_fraction=0.15
                ),
                1.0,
            ),
            (_spec(s, 425 + i), 0.6 if even else 1.5),
            (_spec(s, 445 + i, mpp=0.2 if even else 0.5, width_mm=2.0, height_mm=1.0), 1.0),
        ]
        held += [
            (_spec(s, 431 + i), 1.0),
            (_spec(s, 435 + i, monolayer_fraction=0.15, thick_fraction=0.25), 1.0),
            (
                _spec(
                    s, 455 + i, monolayer_fraction=0.35, thick_fraction=0.1, feathered_fraction=0.2
                ),
                1.0,
            ),
            (_spec(s, 465 + i), 1.4 if even else 0.7),
            (_spec(s, 475 + i, mpp=0.5 if even else 0.2, width_mm=2.0, height_mm=1.0), 1.0),
        ]
    return {"tuning": tuning, "held-back": held}


def _study_one(out: str, spec: SmearSpec, gain: float) -> dict:
    name = f"{spec.source}_{spec.seed}"
    sm = build_whole_smear(out, replace(spec, stain_gain=gain), name=name)
    z = _zone(str(sm.path), str(sm.zones_path), str(sm.truth_path))
    z["name"] = name
    for p in sm.path.parent.glob(f"{name}.*"):
        p.unlink()
    return z


def _study_stability(out: str, spec: SmearSpec) -> dict:
    """Red-cell OD of ``spec`` as generated, without white cells, and with other window counts."""
    ods = {}
    for label, sp in (("wbc", spec), ("no_wbc", replace(spec, wbc_per_mm2=0.0))):
        sm = build_whole_smear(out, sp, name=f"st_{label}")
        ods[label] = zone_map_from_path(sm.path).cell_od
        if label == "wbc":
            ods["tiles"] = [
                zone_map_from_path(sm.path, ZoneSettings(calib_tiles=n)).cell_od
                for n in (230, 256, 300)
            ]
        for p in sm.path.parent.glob(f"st_{label}.*"):
            p.unlink()
    return ods


def run_sets() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_ZONES_DIR")) as tmp:
        for set_name, items in study_sets().items():
            res = []
            for spec, gain in items:
                z = _study_one(tmp, spec, gain)
                ag = z["agreement"]
                print(
                    f"{set_name} {z['name']} (mono {spec.monolayer_fraction:.0%}, thick "
                    f"{spec.thick_fraction:.0%}, {spec.mpp} µm/px, stain x{gain}): agreement "
                    f"{ag['overall']:.3f} {ag['per_zone']}, red-cell OD {z['cell_od']:.3f}, "
                    f"monolayer cells lost {z['lost']}/{z['mono_cells']}",
                    flush=True,
                )
                res.append((spec.source, z))
            for src in (*_SOURCES, "all"):
                zs = [z for s, z in res if src in ("all", s)]
                ov = [z["agreement"]["overall"] for z in zs]
                tag = f"{set_name}_{src}"
                rows.append(
                    _row(f"zone_agreement_mean_{tag}", float(np.mean(ov)), "area", ">= 0.95")
                )
                rows.append(_row(f"zone_agreement_min_{tag}", float(np.min(ov)), "area", ">= 0.90"))
                for zn in ZONE_NAMES:
                    v = [z["agreement"]["per_zone"][zn] for z in zs]
                    v = [x for x in v if x is not None]
                    if v:
                        rows.append(
                            _row(f"zone_agreement_{zn}_{tag}", float(np.mean(v)), "area", "")
                        )
                rows.append(
                    _row(
                        f"monolayer_cells_lost_{tag}",
                        sum(z["lost"] for z in zs),
                        f"of {sum(z['mono_cells'] for z in zs)}",
                        "",
                    )
                )
        worst_wbc = worst_tiles = 0.0
        for spec, _ in study_sets()["tuning"][:12]:
            ods = _study_stability(tmp, spec)
            d = abs(ods["no_wbc"] / ods["wbc"] - 1.0)
            t = max(ods["tiles"]) / min(ods["tiles"]) - 1.0
            worst_wbc, worst_tiles = max(worst_wbc, d), max(worst_tiles, t)
            print(
                f"stability {spec.source}_{spec.seed}: red-cell OD {ods['wbc']:.3f}, without white "
                f"cells {ods['no_wbc']:.3f} ({d:.1%}), 230/256/300 windows "
                f"{', '.join(f'{v:.3f}' for v in ods['tiles'])}",
                flush=True,
            )
        rows.append(_row("cell_od_change_without_wbc_max", worst_wbc, "fraction", "<= 0.02"))
        rows.append(
            _row("cell_od_spread_over_window_counts_max", worst_tiles, "fraction", "<= 0.02")
        )
    return rows


def _row(name: str, value, unit: str, goal: str) -> dict:
    return {"name": name, "value": value, "unit": unit, "goal": goal, "detail": ""}


if __name__ == "__main__":
    for r in run():
        print(r)
