"""Detection-stage scaling from 1 to 2 Ray workers (goal ≥ 1.7x) and end-to-end job throughput.

Part 1, on a local 2-CPU Ray cluster: ``_SLIDES`` copies of a smear slide at normal white-cell
density (11,520 x 8,640 px, a 4x pyramid, 3 WBCs: ``bench_detect._smear_slide``) on moto's S3
server (loopback), listed as the job lists them, each detected by the job's own detect stage
(:func:`pipeline.job.stage_detect.detect_batch`: ranged reads, detection, crops, morphometry,
thumbnails, records) in a 1-CPU task. Two ways of running the tasks, each with one worker and
with two, alternating, ``_REPEATS`` times (the fastest pass counts), after a warm-up:

* the job's way, a Ray Data ``map_batches`` (``TaskPoolStrategy(size=workers)``): its executor
  learns of a finished task through ``ray.wait(..., timeout=0.1 s)`` over every task in flight,
  so with two in flight each finish can wait up to 0.1 s for the next dispatch, and the executor
  itself needs CPU on the same two busy cores;
* plain Ray tasks all submitted at once (a custom resource admits one or two at a time), so the
  raylet starts the next one as soon as a worker is free: the stage's own scaling.

Reported: slides/s of each and the ratios. The S3 server, the Ray driver and the raylet share
the two cores (with one worker they have the second core to themselves); the load average at the
start and the machine's busy CPU seconds per pass are printed. Slides of a few seconds exaggerate
the per-task costs: a real slide takes minutes of detection.

Part 2: the nightly job (``pipeline.job.run_job``) on the demo archive (three sample slides and
one corrupt object, seeded by ``pipeline.job.demo.seed_archive``) with the bundled demo
checkpoint captioning on CPU: slides/hour, and the per-slide stage costs the job records
(``slides/`` columns ``stage_seconds``, ``detect_seconds``, ``caption_seconds``,
``bytes_read``) that ``docs/scaling.md`` extrapolates from.
Run alone: ``python -m bench.bench_scaling``.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path

_SLIDES = 8  # copies of the smear slide (distinct keys) per timed pass
_REPEATS = 3  # timed passes per setting, alternating
_BUCKET = "bench-scaling"


def _detect_task(batch: dict, settings) -> dict:
    """Ray Data UDF running the job's own detect stage (:func:`pipeline.job.stage_detect.detect_batch`:
    ranged reads from S3, detection, crops, morphometry, thumbnails, JSON records) on one slide.
    In: ``ref`` (N,) JSON slide references. Out: ``cells`` (N,) int, ``bytes`` (N,) int S3 bytes
    fetched, ``seconds`` (N,) float wall time of the stage on the slide."""

    import numpy as np

    from pipeline.job.stage_detect import detect_batch, records

    cells, nbytes, secs = [], [], []
    for ref in batch["ref"]:
        t = time.perf_counter()
        n, outcome = 0, None
        for out in detect_batch({"ref": np.array([ref], dtype=object)}, settings):
            n += int((out["kind"] == "cell").sum())
            for rec in records(out):
                if "status" in rec:
                    outcome = rec
        secs.append(time.perf_counter() - t)
        if outcome is None or outcome["status"] != "ok":
            raise RuntimeError(f"detect stage failed on a benchmark slide: {outcome}")
        cells.append(n)
        nbytes.append(int(outcome["bytes_read"] or 0))
    return {"cells": np.array(cells), "bytes": np.array(nbytes), "seconds": np.array(secs)}


def _pass(refs: list[str], settings, workers: int) -> tuple[float, list[dict]]:
    """One timed pass through a Ray Data ``map_batches`` capped at ``workers`` tasks."""
    import ray

    ctx = ray.data.DataContext.get_current()
    # Ray Data reserves part of a 2-CPU cluster per operator and then admits one 1-CPU task at a
    # time (measured: the 2-worker pass ran serially); one operator needs no reservation.
    ctx.op_resource_reservation_enabled = False
    ds = ray.data.from_items([{"ref": r} for r in refs], override_num_blocks=len(refs)).map_batches(
        _detect_task,
        fn_kwargs={"settings": settings},
        batch_size=1,
        num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=workers),
    )
    busy0 = _busy_cpu_seconds()
    t = time.perf_counter()
    rows = ds.take_all()
    wall = time.perf_counter() - t
    _BUSY.setdefault(("ray data", workers), []).append(
        (_busy_cpu_seconds() - busy0, sum(float(r["seconds"]) for r in rows))
    )
    return wall, rows


def _task_pass(refs: list[str], settings, workers: int) -> tuple[float, list[dict]]:
    """One timed pass of plain Ray tasks, all submitted at once; ``_SLOT`` admits ``workers``."""
    import numpy as np
    import ray

    remote = ray.remote(num_cpus=1)(_detect_task).options(resources={_SLOT: 2 // workers})
    busy0 = _busy_cpu_seconds()
    t = time.perf_counter()
    outs = ray.get([remote.remote({"ref": np.array([r], dtype=object)}, settings) for r in refs])
    wall = time.perf_counter() - t
    rows = [{k: v[0] for k, v in o.items()} for o in outs]
    _BUSY.setdefault(("ray tasks", workers), []).append(
        (_busy_cpu_seconds() - busy0, sum(float(r["seconds"]) for r in rows))
    )
    return wall, rows


_SLOT = "bench_scaling_slot"  # custom resource: 2 per node; a task takes 2 (one at a time) or 1
_BUSY: dict[
    tuple[str, int], list[tuple[float, float]]
] = {}  # (way, workers) -> [(machine CPU-s, task s)]


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (every process, not idle or iowait)."""
    import psutil

    t = psutil.cpu_times()
    return (
        t.user
        + t.system
        + getattr(t, "nice", 0.0)
        + getattr(t, "irq", 0.0)
        + getattr(t, "softirq", 0.0)
    )


def _scaling(client, endpoint: str, slide: Path) -> list[dict]:
    from pipeline.job.listing import list_slides
    from pipeline.job.stage_detect import DetectSettings, ref_to_json
    from pipeline.job.storage import S3Settings, storage_for

    for i in range(_SLIDES):
        client.upload_file(str(slide), _BUCKET, f"copy{i:02d}/{slide.name}")
    s3 = S3Settings(endpoint=endpoint)
    listing = list_slides(
        storage_for(f"s3://{_BUCKET}/", s3), f"s3://{_BUCKET}/", (".tiff", ".svs")
    )
    refs = [ref_to_json(r) for r in listing.slides]
    assert len(refs) == _SLIDES, f"listed {len(refs)} of {_SLIDES} benchmark slides"
    settings = DetectSettings(s3=s3)
    rows: list[dict] = []
    for way, run_pass in (("ray data", _pass), ("ray tasks", _task_pass)):
        # Warm-up, whole 2-worker passes: both workers start, import and make their first calls
        # (with two slides only, both could land on one worker and leave the other cold). Ray
        # Data's first dataset also starts its internal actors (stats, autoscaling coordinator),
        # which then keep part of a core busy for seconds (measured: ~1.2 CPU-s each during the
        # first pass): two passes for it, so the timed passes do not share the cores with that.
        for _ in range(2 if way == "ray data" else 1):
            run_pass(refs, settings, 2)
        _BUSY.pop((way, 2), None)
        load = os.getloadavg()[0]
        # Alternate and keep each setting's fastest pass: other processes' load comes and goes.
        t1, rows1 = run_pass(refs, settings, 1)
        t2, rows2 = run_pass(refs, settings, 2)
        for _ in range(_REPEATS - 1):
            t1 = min(t1, run_pass(refs, settings, 1)[0])
            t2 = min(t2, run_pass(refs, settings, 2)[0])
        cells = sum(int(r["cells"]) for r in rows2)
        assert sum(int(r["cells"]) for r in rows1) == cells, "the two passes found different cells"
        per_slide = statistics.median(float(r["seconds"]) for r in rows1)
        print(
            f"detection stage as {way}, {_SLIDES} slides ({cells} cells): 1 worker {t1:.2f} s, 2 workers "
            f"{t2:.2f} s, {t1 / t2:.2f}x; median {per_slide:.2f} s/slide with one worker; load average at "
            f"start {load:.2f}"
        )
        for w in (1, 2):
            busy = statistics.mean(b for b, _ in _BUSY[(way, w)])
            tasks = statistics.mean(t for _, t in _BUSY[(way, w)])
            print(
                f"  {w} worker(s): machine busy {busy:.1f} CPU-s per pass; detect tasks ran {tasks:.1f} s"
            )
        tag = "ray_data" if way == "ray data" else "ray_tasks"
        detail = (
            f"{_SLIDES} slides of 11,520 x 8,640 px at normal WBC density, {cells} cells, "
            f"load avg {load:.2f} at start"
        )
        rows += [
            {
                "name": f"detect_{tag}_1_worker",
                "value": _SLIDES / t1,
                "unit": "slides/s",
                "goal": "",
                "detail": detail,
            },
            {
                "name": f"detect_{tag}_2_workers",
                "value": _SLIDES / t2,
                "unit": "slides/s",
                "goal": "",
                "detail": detail,
            },
            {
                "name": f"detect_{tag}_scaling_1_to_2",
                "value": t1 / t2,
                "unit": "x",
                "goal": ">= 1.7",
                "detail": detail,
            },
        ]
        if way == "ray data":
            rows.append(
                {
                    "name": "detect_stage_seconds_per_slide",
                    "value": per_slide,
                    "unit": "s/slide (1 core)",
                    "goal": "",
                    "detail": "median wall time of one slide's detect task, one worker",
                }
            )
    return rows


def _job(endpoint: str, out: Path) -> list[dict]:
    from pipeline.job import JobConfig, run_job
    from pipeline.job.config import DEFAULT_FORWARD_ENV
    from pipeline.job.demo import DEMO_BUCKET, DEMO_PREFIX, seed_archive

    seed_archive(endpoint)
    cfg = JobConfig(
        input=f"s3://{DEMO_BUCKET}/{DEMO_PREFIX}",
        output=str(out),
        s3_endpoint=endpoint,
        max_failed_fraction=0.5,
        forward_env=DEFAULT_FORWARD_ENV,
    )
    t = time.perf_counter()
    res = run_job(cfg, lambda line: None)
    wall = time.perf_counter() - t
    ok = [s for s in res.slides if s.get("status") == "ok"]
    if not ok:
        raise RuntimeError(f"the job processed no slide successfully (status {res.status})")

    def mean(col: str) -> float:
        vals = [float(s[col]) for s in ok if s.get(col) is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    cells = sum(int(s["cell_count"]) for s in ok)
    read = [s for s in ok if s.get("bytes_read") is not None]
    ratio = (
        sum(int(s["bytes_read"]) for s in read) / sum(int(s["slide_bytes"]) for s in read)
        if read
        else float("nan")
    )
    print(
        f"job: {len(ok)} ok + {res.failed} failed slides, {cells} cells in {wall:.1f} s; per slide: stage "
        f"{mean('stage_seconds'):.2f} s, detect {mean('detect_seconds'):.2f} s, caption {mean('caption_seconds'):.2f} s "
        f"(CPU, demo checkpoint); bytes_read/slide_bytes {ratio:.2f}"
    )
    detail = (
        f"{len(ok)} sample slides + 1 corrupt, {cells} cells, captioning on CPU (demo checkpoint)"
    )
    return [
        {
            "name": "job_slides_per_hour",
            "value": len(ok) / wall * 3600,
            "unit": "slides/h",
            "goal": "",
            "detail": detail,
        },
        {
            "name": "job_stage_seconds_per_slide",
            "value": mean("stage_seconds"),
            "unit": "s",
            "goal": "",
            "detail": detail,
        },
        {
            "name": "job_detect_seconds_per_slide",
            "value": mean("detect_seconds"),
            "unit": "s",
            "goal": "",
            "detail": detail,
        },
        {
            "name": "job_caption_seconds_per_cell",
            "value": mean("caption_seconds") * len(ok) / max(cells, 1),
            "unit": "s (CPU)",
            "goal": "",
            "detail": detail,
        },
        {
            "name": "job_bytes_read_ratio",
            "value": ratio,
            "unit": "read/size",
            "goal": "",
            "detail": detail,
        },
    ]


def run() -> list[dict]:
    import ray

    from bench.bench_s3_reads import s3_client
    from pipeline.job.demo import use_local_test_environment

    use_local_test_environment("bench")  # dummy credentials for moto, before Ray starts
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset progress lines
    rows: list[dict] = []
    started = not ray.is_initialized()
    with tempfile.TemporaryDirectory() as tmp, s3_client() as (client, endpoint):
        if started:
            ray.init(
                num_cpus=2,
                resources={_SLOT: 2},
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
            )
        try:
            client.create_bucket(Bucket=_BUCKET)
            from bench.bench_detect import _smear_slide

            smear = Path(tmp) / "smear-large.tiff"
            _smear_slide(smear, grid=18)
            rows += _scaling(client, endpoint, smear)
            try:
                rows += _job(endpoint, Path(tmp) / "job-output")
            except Exception as exc:  # noqa: BLE001 - the job is another part; report, keep part 1
                traceback.print_exc()
                rows.append(
                    {
                        "name": "job_slides_per_hour",
                        "value": float("nan"),
                        "unit": "slides/h",
                        "goal": "",
                        "detail": f"job not runnable: {type(exc).__name__}: {exc}",
                    }
                )
        finally:
            if started:
                ray.shutdown()
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
