"""Zone maps against the whole-smear generator's truth: agreement per zone, seconds, selection.

Generates whole-smear slides (:mod:`pipeline.whole_smear`, several seeds and TXL-PBC sources),
zones them (:func:`pipeline.zones.zone_map`) and reports area agreement with the truth raster
(goal >= 0.90), generation and zoning seconds, and the fraction of level-0 area that
``region_boxes(("monolayer",))`` selects (the share a job restricted to the monolayer reads).
``BENCH_ZONES_LARGE=1`` adds a 5 GP slide (25 x 12.5 mm at 0.25 µm/px) at 10 % and 40 %
monolayer (several minutes each on 2 cores).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from pipeline.whole_smear import SmearSpec, build_whole_smear, smear_gigapixels
from pipeline.zones import agreement, zone_map_from_path

_CASES = [
    SmearSpec(width_mm=8.0, height_mm=4.0, seed=101, source="pbc", monolayer_fraction=0.3),
    SmearSpec(width_mm=4.0, height_mm=2.0, seed=102, source="raabin", monolayer_fraction=0.4),
    SmearSpec(width_mm=4.0, height_mm=2.0, seed=103, source="kaggle", monolayer_fraction=0.1),
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


def run() -> list[dict]:
    cases = _CASES + (_LARGE if os.environ.get("BENCH_ZONES_LARGE") == "1" else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in cases:
            label = (
                f"{spec.source}_{smear_gigapixels(spec):.2f}GP_mono{spec.monolayer_fraction:.0%}"
            )
            sm = build_whole_smear(tmp, spec, name=f"s{spec.seed}")
            t0 = time.perf_counter()
            zm = zone_map_from_path(sm.path)
            zone_s = time.perf_counter() - t0
            truth = np.load(sm.zones_path)["labels"]
            ag = agreement(zm.labels_on(truth.shape), truth)
            sel = zm.selected_fraction(("monolayer",))
            detail = f"{sm.width}x{sm.height} px, {sm.n_wbc} WBC, per zone {ag['per_zone']}"
            print(
                f"{label}: agreement {ag['overall']:.3f} {ag['per_zone']}; generate {sm.seconds:.1f} s, "
                f"zone {zone_s:.2f} s, monolayer tiles {sel:.3f} of level 0"
            )
            rows += [
                {
                    "name": f"zone_agreement_{label}",
                    "value": ag["overall"],
                    "unit": "area",
                    "goal": ">= 0.90",
                    "detail": detail,
                },
                {
                    "name": f"generate_s_{label}",
                    "value": sm.seconds,
                    "unit": "s",
                    "goal": "",
                    "detail": detail,
                },
                {
                    "name": f"zone_s_{label}",
                    "value": zone_s,
                    "unit": "s",
                    "goal": "",
                    "detail": detail,
                },
                {
                    "name": f"monolayer_selected_{label}",
                    "value": sel,
                    "unit": "of level 0",
                    "goal": "",
                    "detail": detail,
                },
            ]
            for p in (sm.path, sm.truth_path, sm.zones_path):
                p.unlink()
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
