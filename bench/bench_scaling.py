"""Detection-stage scaling from 1 to 2 Ray workers (goal ≥ 1.7x) and end-to-end job throughput.

Part 1, one Ray Data pipeline on a local 2-CPU Ray cluster: ``_SLIDES`` sample slides on moto's
S3 server (loopback), listed as the job lists them -> a 1-CPU task per slide running the job's
own detect stage (:func:`pipeline.job.stage_detect.detect_batch`: ranged reads, detection, crops,
morphometry, thumbnails, records) -> collected on the driver. With one worker
(``TaskPoolStrategy(size=1)``) and with two, alternating, ``_REPEATS`` times each (the fastest
pass of each counts), after a warm-up that imports everything in both workers. Reported: slides/s
of each and their ratio. The S3 server, the Ray driver and the raylet run on the same two cores
(with one worker they have the second core to themselves): the load average at the start and
the CPU seconds they used per pass are printed.

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

_SLIDES = 12  # sample slides (copies under distinct keys) per timed pass
_REPEATS = 3  # timed passes per setting, alternating
_BUCKET = "bench-scaling"


def _detect_task(batch: dict, settings) -> dict:
    """Ray Data UDF running the job's own detect stage (:func:`pipeline.job.stage_detect.detect_batch`:
    ranged reads from S3, detection, crops, morphometry, thumbnails, JSON records) on one slide.
    In: ``ref`` (N,) JSON slide references. Out: ``cells`` (N,) int, ``bytes`` (N,) int S3 bytes
    fetched, ``seconds`` (N,) float wall time of the stage on the slide."""
    import json

    import numpy as np

    from pipeline.job.stage_detect import detect_batch

    cells, nbytes, secs = [], [], []
    for ref in batch["ref"]:
        t = time.perf_counter()
        n, outcome = 0, None
        for out in detect_batch({"ref": np.array([ref], dtype=object)}, settings):
            n += int((out["kind"] == "cell").sum())
            for kind, rec in zip(out["kind"], out["record"]):
                if kind == "slide":
                    outcome = json.loads(rec)
        secs.append(time.perf_counter() - t)
        if outcome is None or outcome["status"] != "ok":
            raise RuntimeError(f"detect stage failed on a benchmark slide: {outcome}")
        cells.append(n)
        nbytes.append(int(outcome["bytes_read"] or 0))
    return {"cells": np.array(cells), "bytes": np.array(nbytes), "seconds": np.array(secs)}


def _pass(refs: list[str], settings, workers: int) -> tuple[float, list[dict]]:
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
    _BUSY.setdefault(workers, []).append((_busy_cpu_seconds() - busy0, sum(float(r["seconds"]) for r in rows)))
    return wall, rows


_BUSY: dict[int, list[tuple[float, float]]] = {}  # workers -> [(machine CPU-s, task wall-s)] per pass


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (every process, not idle or iowait)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def _scaling(client, endpoint: str, slides: list[Path]) -> list[dict]:
    from pipeline.job.listing import list_slides
    from pipeline.job.stage_detect import DetectSettings, ref_to_json
    from pipeline.job.storage import S3Settings, storage_for

    for i in range(_SLIDES):
        p = slides[i % len(slides)]
        client.upload_file(str(p), _BUCKET, f"copy{i:02d}/{p.name}")
    s3 = S3Settings(endpoint=endpoint)
    listing = list_slides(storage_for(f"s3://{_BUCKET}/", s3), f"s3://{_BUCKET}/", (".tiff", ".svs"))
    refs = [ref_to_json(r) for r in listing.slides]
    assert len(refs) == _SLIDES, f"listed {len(refs)} of {_SLIDES} benchmark slides"
    settings = DetectSettings(s3=s3)
    _pass(refs[:2], settings, 2)  # warm-up: worker start, imports, first OpenSlide/cv2 calls
    load = os.getloadavg()[0]
    # Alternate and keep each setting's fastest pass: other processes' load comes and goes.
    t1, rows1 = _pass(refs, settings, 1)
    t2, rows2 = _pass(refs, settings, 2)
    for _ in range(_REPEATS - 1):
        t1 = min(t1, _pass(refs, settings, 1)[0])
        t2 = min(t2, _pass(refs, settings, 2)[0])
    cells = sum(int(r["cells"]) for r in rows2)
    assert sum(int(r["cells"]) for r in rows1) == cells, "the two passes found different cells"
    per_slide = statistics.median(float(r["seconds"]) for r in rows1)
    print(
        f"detection stage, {_SLIDES} slides ({cells} cells): 1 worker {t1:.1f} s, 2 workers {t2:.1f} s; "
        f"median {per_slide:.2f} s/slide (open + detect + crops from S3); load average at start {load:.2f}"
    )
    for w, passes in sorted(_BUSY.items()):
        timed = passes[1:] if w == 2 else passes  # the first 2-worker pass is the warm-up
        busy = statistics.mean(b for b, _ in timed)
        tasks = statistics.mean(t for _, t in timed)
        print(f"  {w} worker(s): machine busy {busy:.1f} CPU-s per pass, detect tasks {tasks:.1f} s of it; "
              f"the rest ({busy - tasks:.1f} CPU-s) is the S3 server, Ray and other processes")
    detail = f"{_SLIDES} slides, {cells} cells, load avg {load:.2f} at start"
    return [
        {"name": "detect_stage_1_worker", "value": _SLIDES / t1, "unit": "slides/s", "goal": "", "detail": detail},
        {"name": "detect_stage_2_workers", "value": _SLIDES / t2, "unit": "slides/s", "goal": "", "detail": detail},
        {"name": "detect_stage_scaling_1_to_2", "value": t1 / t2, "unit": "x", "goal": ">= 1.7", "detail": detail},
        {"name": "detect_stage_seconds_per_slide", "value": per_slide, "unit": "s/slide (1 core)", "goal": "",
         "detail": "median wall time of one sample slide's detect task (2,800 x 2,160 px, ~14 cells)"},
    ]


def _job(endpoint: str, out: Path) -> list[dict]:
    from pipeline.job import JobConfig, run_job
    from pipeline.job.config import DEFAULT_FORWARD_ENV
    from pipeline.job.demo import DEMO_BUCKET, DEMO_PREFIX, seed_archive

    seed_archive(endpoint)
    cfg = JobConfig(
        input=f"s3://{DEMO_BUCKET}/{DEMO_PREFIX}", output=str(out), s3_endpoint=endpoint,
        max_failed_fraction=0.5, forward_env=DEFAULT_FORWARD_ENV,
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
    ratio = sum(int(s["bytes_read"]) for s in read) / sum(int(s["slide_bytes"]) for s in read) if read else float("nan")
    print(
        f"job: {len(ok)} ok + {res.failed} failed slides, {cells} cells in {wall:.1f} s; per slide: stage "
        f"{mean('stage_seconds'):.2f} s, detect {mean('detect_seconds'):.2f} s, caption {mean('caption_seconds'):.2f} s "
        f"(CPU, demo checkpoint); bytes_read/slide_bytes {ratio:.2f}"
    )
    detail = f"{len(ok)} sample slides + 1 corrupt, {cells} cells, captioning on CPU (demo checkpoint)"
    return [
        {"name": "job_slides_per_hour", "value": len(ok) / wall * 3600, "unit": "slides/h", "goal": "", "detail": detail},
        {"name": "job_stage_seconds_per_slide", "value": mean("stage_seconds"), "unit": "s", "goal": "", "detail": detail},
        {"name": "job_detect_seconds_per_slide", "value": mean("detect_seconds"), "unit": "s", "goal": "", "detail": detail},
        {"name": "job_caption_seconds_per_cell", "value": mean("caption_seconds") * len(ok) / max(cells, 1),
         "unit": "s (CPU)", "goal": "", "detail": detail},
        {"name": "job_bytes_read_ratio", "value": ratio, "unit": "read/size", "goal": "", "detail": detail},
    ]


def run() -> list[dict]:
    import ray

    from bench.bench_s3_reads import build_slides, s3_client
    from pipeline.job.demo import use_local_test_environment

    use_local_test_environment("bench")  # dummy credentials for moto, before Ray starts
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset progress lines
    rows: list[dict] = []
    started = not ray.is_initialized()
    with tempfile.TemporaryDirectory() as tmp, s3_client() as (client, endpoint):
        if started:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
        try:
            client.create_bucket(Bucket=_BUCKET)
            slides = build_slides(Path(tmp))[:3]
            rows += _scaling(client, endpoint, slides)
            try:
                rows += _job(endpoint, Path(tmp) / "job-output")
            except Exception as exc:  # noqa: BLE001 - the job is another part; report, keep part 1
                traceback.print_exc()
                rows.append({"name": "job_slides_per_hour", "value": float("nan"), "unit": "slides/h", "goal": "",
                             "detail": f"job not runnable: {type(exc).__name__}: {exc}"})
        finally:
            if started:
                ray.shutdown()
    return rows


if __name__ == "__main__":
    for r in run():
        print(r)
