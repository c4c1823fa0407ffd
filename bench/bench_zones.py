"""Zone maps against the whole-smear generator's truth: agreement per zone, seconds, selection.

Generates whole-smear slides (:mod:`pipeline.whole_smear`, several seeds and TXL-PBC sources),
zones them (:func:`pipeline.zones.zone_map`) and reports area agreement with the truth raster
(goal >= 0.90, overall and per zone), generation and zoning seconds, the peak RSS of each (each
runs in its own process, so the figure is that step's alone), and the fraction of level-0 area
that ``region_boxes(("monolayer",))`` selects (the share a job restricted to the monolayer
reads; with the default 4096-px region tiles and with 1024-px ones). ``BENCH_ZONES_LARGE=1``
adds a 5 GP slide (25 x 12.5 mm at 0.25 µm/px) at 10 % and at 40 % monolayer (minutes each;
~0.5 GB of disk each, removed after use).
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from pipeline.whole_smear import SmearSpec, build_whole_smear, smear_gigapixels
from pipeline.zones import agreement, zone_map_from_path

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


def _zone(path: str, truth_path: str) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    zm = zone_map_from_path(path)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    truth = np.load(truth_path)["labels"]
    return {
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
    cases = _CASES + (_LARGE if os.environ.get("BENCH_ZONES_LARGE") == "1" else [])
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_ZONES_DIR")) as tmp:
        for spec in cases:
            label = (
                f"{spec.source}_{smear_gigapixels(spec):.2f}GP_mono{spec.monolayer_fraction:.0%}"
            )
            sm, gen_cpu, gen_mib = _in_child(_generate, tmp, spec, f"s{spec.seed}")
            z = _in_child(_zone, str(sm.path), str(sm.zones_path))
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
                f"({z['selected_1024']:.3f} in 1024-px tiles)",
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
            ]
            rows += [
                {"name": n, "value": v, "unit": u, "goal": g, "detail": detail}
                for n, v, u, g in per
            ]
            for p in sm.path.parent.glob(f"s{spec.seed}.*"):
                p.unlink()
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
