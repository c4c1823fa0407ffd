"""Detection-stage scaling from 1 to 2 Ray workers (goal ≥ 1.7x) and end-to-end job throughput.

Part 1, one Ray Data pipeline run twice on a local 2-CPU Ray cluster: ``_SLIDES`` sample slides
on moto's S3 server (loopback) -> a task per slide that opens it with the remote TIFF backend,
runs :func:`pipeline.detect.detect_slide` and returns its cell count -> collected on the driver.
With one worker (``TaskPoolStrategy(size=1)``) and with two, alternating, twice each (the
faster pass of each counts), after a warm-up that imports everything in both workers. Reported: slides/s of each and their ratio. Other processes
on the machine compete for the same two cores: the load average at the start is printed.

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

_SLIDES = 8  # sample slides (copies under distinct keys) per timed pass
_BUCKET = "bench-scaling"


def _detect_task(batch: dict, endpoint: str) -> dict:
    """Ray Data UDF. In: ``key`` (N,) object keys. Out: ``key``, ``cells`` (N,) int, ``bytes``
    (N,) int S3 bytes fetched, ``seconds`` (N,) float wall time of open + detect."""
    import boto3
    import numpy as np

    from bench.bench_s3_reads import detect_remote
    from pipeline.slides._remote_tiff import open_remote_slide

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    cells, nbytes, secs = [], [], []
    for key in batch["key"]:
        t = time.perf_counter()
        with open_remote_slide(client, _BUCKET, str(key)) as slide:
            cells.append(len(detect_remote(slide).records))
            nbytes.append(slide.bytes_fetched)
        secs.append(time.perf_counter() - t)
    return {"key": batch["key"], "cells": np.array(cells), "bytes": np.array(nbytes), "seconds": np.array(secs)}


def _pass(keys: list[str], endpoint: str, workers: int) -> tuple[float, list[dict]]:
    import ray

    ctx = ray.data.DataContext.get_current()
    # Ray Data reserves part of a 2-CPU cluster per operator and then admits one 1-CPU task at a
    # time (measured: the 2-worker pass ran serially); one operator needs no reservation.
    ctx.op_resource_reservation_enabled = False
    ds = ray.data.from_items([{"key": k} for k in keys], override_num_blocks=len(keys)).map_batches(
        _detect_task,
        fn_kwargs={"endpoint": endpoint},
        batch_size=1,
        num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=workers),
    )
    t = time.perf_counter()
    rows = ds.take_all()
    return time.perf_counter() - t, rows


def _scaling(client, endpoint: str, slides: list[Path]) -> list[dict]:
    keys = []
    for i in range(_SLIDES):
        p = slides[i % len(slides)]
        key = f"copy{i}/{p.name}"
        client.upload_file(str(p), _BUCKET, key)
        keys.append(key)
    _pass(keys[:2], endpoint, 2)  # warm-up: worker start, imports, first OpenSlide/cv2 calls
    load = os.getloadavg()[0]
    # Alternate twice and keep each setting's faster pass: other processes' load comes and goes.
    t1, rows1 = _pass(keys, endpoint, 1)
    t2, rows2 = _pass(keys, endpoint, 2)
    t1 = min(t1, _pass(keys, endpoint, 1)[0])
    t2 = min(t2, _pass(keys, endpoint, 2)[0])
    cells = sum(int(r["cells"]) for r in rows2)
    assert sum(int(r["cells"]) for r in rows1) == cells, "the two passes found different cells"
    per_slide = statistics.median(float(r["seconds"]) for r in rows1)
    print(
        f"detection stage, {_SLIDES} slides ({cells} cells): 1 worker {t1:.1f} s, 2 workers {t2:.1f} s; "
        f"median {per_slide:.2f} s/slide (open + detect + crops from S3); load average at start {load:.2f}"
    )
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
