"""Gigapixel slides in the job's detect stage: region tasks fanned out vs one process.

One generated whole smear (``pipeline.whole_smear``, 30 % monolayer) goes through the job's own
detect stage (:func:`pipeline.job.stage_detect.process_slide`, zones = monolayer) inside a Ray
task on a local cluster, twice: region tasks run one after another in the slide's task
(``region_tasks_in_flight=0``), and fanned out as Ray tasks (2 in flight, 64 level-0 Mpx each).
Reports wall time of each and their ratio, peak RSS (``ru_maxrss``) of the slide's process and of
the region workers (as the stage records them in the outcome, ``region_peak_rss_mib``), the cell
count, and whether both modes give the same cells (they must).

Sizes: 0.5 GP (8 x 4 mm at 0.25 µm/px); ``BENCH_REGIONS_LARGE=1``: 5 GP (25 x 12.5 mm; ~15 min
to build and run on 2 cores). Run alone: ``python -m bench.bench_regions``.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path


def _one(ref, kw: dict) -> dict:
    """In a Ray task: the slide through the detect stage; wall, peak RSS, cell centroids."""
    from pipeline.job.stage_detect import DetectSettings, process_slide, records

    t = time.perf_counter()
    keys, outcome = [], None
    for batch in process_slide(ref, DetectSettings(s3=None, thumbnails=True, **kw)):
        for r in records(batch):
            if "status" in r:
                outcome = r
            else:
                keys.append((r["centroid_x"], r["centroid_y"]))
    return {
        "wall": time.perf_counter() - t,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "keys": sorted(keys),
        "status": outcome["status"],
        "reason": outcome["reason"],
        "region_tasks": outcome.get("region_tasks"),
        "region_rss_mib": outcome.get("region_peak_rss_mib"),
    }


def run() -> list[dict]:
    import ray

    from pipeline.job.listing import SlidePart, SlideRef
    from pipeline.whole_smear import SmearSpec, build_whole_smear, smear_gigapixels

    large = os.environ.get("BENCH_REGIONS_LARGE") == "1"
    spec = SmearSpec(
        width_mm=25.0 if large else 8.0,
        height_mm=12.5 if large else 4.0,
        seed=601,
        source="pbc",
        monolayer_fraction=0.3,
    )
    gp = smear_gigapixels(spec)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(build_whole_smear(tmp, spec, name="regions").path)
        size = path.stat().st_size
        part = SlidePart(str(path), path.name, size, "e")
        ref = SlideRef("ab" * 16, str(path), "e", size, (part,), path.name)
        out = {}
        for mode, kw in (
            ("serial", {"region_tasks_in_flight": 0}),
            ("fanned", {"region_tasks_in_flight": 2, "region_task_px": 64 * 10**6}),
        ):
            # A fresh cluster per mode: a worker process kept from the first would carry its
            # peak RSS into the second.
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            try:
                task = ray.remote(num_cpus=0.5)(_one)
                out[mode] = ray.get(task.remote(ref, {"zones": ("monolayer",), **kw}))
            finally:
                ray.shutdown()
            r = out[mode]
            if r["status"] != "ok":
                raise RuntimeError(f"bench_regions {mode}: slide {r['status']}: {r['reason']}")
            print(
                f"{gp:.2f} GP {mode}: {len(r['keys'])} cells in {r['wall']:.1f} s, "
                f"{r['region_tasks']} region tasks, slide process {r['rss_mib']:.0f} MiB, "
                f"region workers {r['region_rss_mib']} MiB"
            )
    s, f = out["serial"], out["fanned"]
    same = s["keys"] == f["keys"]
    detail = (
        f"{gp:.2f} GP, {len(f['keys'])} cells, {f['region_tasks']} region tasks; serial "
        f"{s['wall']:.0f} s / {s['rss_mib']:.0f} MiB, fanned {f['wall']:.0f} s / "
        f"{f['rss_mib']:.0f} MiB (region workers {f['region_rss_mib']} MiB); same cells: {same}"
    )
    peak = max([f["rss_mib"], *(v for v in [f["region_rss_mib"]] if isinstance(v, int | float))])
    return [
        {
            "name": f"regions_fanned_speedup_{gp:.1f}GP",
            "value": s["wall"] / f["wall"],
            "unit": "x",
            "goal": "> 1 (2 cores)",
            "detail": detail,
        },
        {
            "name": f"regions_peak_rss_per_worker_gib_{gp:.1f}GP",
            "value": peak / 1024,
            "unit": "GiB",
            "goal": "<= 2",
            "detail": detail,
        },
        {
            "name": f"regions_same_cells_{gp:.1f}GP",
            "value": int(same),
            "unit": "bool",
            "goal": "1",
            "detail": detail,
        },
    ]


if __name__ == "__main__":
    for row in run():
        print(row)
