"""Caption stage inside the Ray Data pipeline vs a bare loop: same crops, model, batch size, threads.

Crops come from the bundled sample slides through the real detection stage (repeated to
``--cells``). The bare loop calls ``Captioner.caption`` batch after batch in this process; the
pipeline runs the job's own caption stage (:class:`pipeline.job.stage_caption.CaptionStage`) in a
Ray Data ``map_batches`` actor pool of one actor, fed from the object store. Model loading is
excluded from both: the loop is timed after a warm-up batch (and run before and after the
pipeline, averaged), the pipeline from the moment its actor starts its first batch to the moment
the driver receives the last one.

    python bench/bench_pipeline.py [--cells 192] [--batch-size 16]
    python -m bench            # collects run() with the other benchmarks
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

__all__ = ["run"]


def _crops(n: int) -> np.ndarray:
    from pipeline.detect import DetectConfig, detect_slide
    from pipeline.samples import build_sample_slides

    with tempfile.TemporaryDirectory() as tmp:
        crops = [detect_slide(s.path, DetectConfig()).crops for s in build_sample_slides(tmp)]
    base = np.concatenate(crops)
    return np.ascontiguousarray(np.resize(base, (n, *base.shape[1:])))


def _threads() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)


def _captioner(batch: int, threads: int, model: str | None):
    import torch

    from hemblip import Captioner

    torch.set_num_threads(threads)
    cap = Captioner(model, batch_size=batch)
    cap.caption(np.zeros((batch, 224, 224, 3), np.uint8))  # warm-up
    return cap


def _bare(cap, crops: np.ndarray, batch: int) -> float:
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(crops), batch):
        n += len(cap.caption(crops[i:i + batch]))
    return n / (time.perf_counter() - t0)


def _pipeline(crops: np.ndarray, batch: int, threads: int, model: str | None) -> float:
    import ray

    from pipeline.job.stage_caption import CaptionStage

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(2, _threads()), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        items = [{"kind": "cell", "slide_id": "bench", "crop": c, "record": "{}", "thumbnail": b""} for c in crops]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // batch))
        ds = ds.map_batches(CaptionStage, batch_size=batch, batch_format="numpy",
                            fn_constructor_kwargs={"model": model, "batch_size": batch, "cpu_threads": threads},
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1), num_cpus=0.25)
        first_start, n = None, 0
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            n += int((out["kind"] == "cell").sum())
            s = float(out["caption_started"].min())
            first_start = s if first_start is None else min(first_start, s)
        end = time.time()
        assert n == len(crops), f"pipeline returned {n} of {len(crops)} cells"
        return n / (end - first_start)
    finally:
        if started:
            ray.shutdown()


def run(cells: int = 192, batch_size: int = 16, model: str | None = None, threads: int | None = None) -> list[dict]:
    """Rows ``{name, value, unit, goal}``: pipeline cells/s, bare-loop cells/s, their ratio.

    ``model``: checkpoint directory; None is the bundled demo checkpoint. ``threads``: torch
    threads of both (default 1: what a caption actor with fractional CPUs gets from Ray).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    threads = threads or 1
    crops = _crops(cells)
    cap = _captioner(batch_size, threads, model)
    # The bare loop runs before and after the pipeline; their mean cancels slow drifts of a
    # shared machine's load.
    before = _bare(cap, crops, batch_size)
    pipe = _pipeline(crops, batch_size, threads, model)
    bare = (before + _bare(cap, crops, batch_size)) / 2
    tag = f"{cells} crops {crops.shape[1]} px, batch {batch_size}, {threads} threads, {model or 'demo checkpoint'}"
    return [
        {"name": "caption_stage_in_ray_data_pipeline", "value": round(pipe, 2), "unit": "cells/s", "goal": None, "detail": tag},
        {"name": "caption_bare_loop", "value": round(bare, 2), "unit": "cells/s", "goal": None, "detail": tag},
        {"name": "caption_pipeline_over_bare_loop", "value": round(pipe / bare, 3), "unit": "ratio", "goal": ">= 0.9", "detail": tag},
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the demo checkpoint)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of both (default 1, as in the job)")
    a = ap.parse_args(argv)
    for row in run(a.cells, a.batch_size, a.model, a.threads):
        print(f"{row['name']:<36} {row['value']:>10} {row['unit']:<8} goal {row['goal'] or '-'}  ({row['detail']})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
