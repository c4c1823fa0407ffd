"""Captioning throughput of the BLIP-base architecture on one GPU (bf16, fixed 30 new tokens).

Builds BLIP-base at full size (ViT-B/16 at 384 px + BERT-base decoder, random weights, no
download), then for each batch size times ``generate`` with ``min_new_tokens = max_new_tokens``
so every batch does the same work whatever the weights say. Reports cells/s (model only, inputs
already on the GPU), end-to-end cells/s at the largest batch (uint8 crops -> preprocessing ->
captions -> parsed attributes) for the default device preprocessing and for the PIL image
processor, peak GPU memory and mean GPU utilisation while generating.

One row group runs without CUDA too: preprocessing ms per crop (batch 64, one CPU thread, 224 px
crops to 112 px, the demo checkpoint's size, and to 384 px, BLIP-base's) for the PIL image
processor and for the device path run on the CPU, and their ratio.

``python -m bench bench_caption_gpu`` (or ``python bench/bench_caption_gpu.py``). Without CUDA it
prints "needs CUDA" and the GPU rows say "skipped: needs CUDA". Runs in well under 3 minutes on
one modern GPU.
"""

from __future__ import annotations

import sys
import threading
import time

__all__ = ["run", "BATCH_SIZES", "NEW_TOKENS"]

BATCH_SIZES = (64, 128, 256)
NEW_TOKENS = 30
_REPEATS = 3


def _skipped(reason: str) -> list[dict]:
    rows = [
        {
            "name": f"caption cells/s (batch {b}, {NEW_TOKENS} tokens)",
            "value": reason,
            "unit": "cells/s",
            "goal": "higher",
        }
        for b in BATCH_SIZES
    ]
    b = max(BATCH_SIZES)
    for path in ("device", "processor"):
        rows.append(
            {
                "name": f"end-to-end cells/s ({path} preprocessing, batch {b})",
                "value": reason,
                "unit": "cells/s",
                "goal": "higher",
            }
        )
    rows.append({"name": "peak GPU memory", "value": reason, "unit": "GiB", "goal": "lower"})
    return rows


def _preprocess_rows(batch: int = 64, repeats: int = 5) -> list[dict]:
    """CPU, one thread: ms per 224 px crop, PIL image processor vs the device path run on CPU."""
    import numpy as np
    import torch
    from transformers import BlipImageProcessorPil

    from hemblip.preprocess import plan_for

    crops = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows: list[dict] = []
    try:
        for size in (112, 384):
            proc = BlipImageProcessorPil(size={"height": size, "width": size})
            plan, _ = plan_for(proc)
            ms = {}
            for path, fn in (
                ("processor", lambda p=proc: p(images=list(crops), return_tensors="pt")),
                ("device path on CPU", lambda p=plan: p(crops, "cpu")),
            ):
                fn()  # warm-up
                best = float("inf")
                for _ in range(repeats):
                    t = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - t)
                ms[path] = best / batch * 1e3
                rows.append(
                    {
                        "name": f"preprocess ms/crop, {path} (224->{size} px, batch {batch}, 1 thread)",
                        "value": ms[path],
                        "unit": "ms",
                        "goal": "lower",
                    }
                )
            rows.append(
                {
                    "name": f"preprocess speed-up, device path on CPU vs processor (224->{size} px)",
                    "value": ms["processor"] / ms["device path on CPU"],
                    "unit": "x",
                    "goal": "higher",
                }
            )
    finally:
        torch.set_num_threads(threads)
    return rows


class _UtilSampler:
    """Mean GPU utilisation (%) over a window, sampled every 50 ms via NVML (None without it)."""

    def __init__(self, device_index: int):
        self.samples: list[int] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 - NVML is optional: utilisation is then reported as n/a
            self._nvml = None

    def __enter__(self):
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._nvml is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def run() -> list[dict]:
    """Benchmark rows: ``{"name", "value", "unit", "goal"}``."""
    import numpy as np
    import torch

    cpu_rows = _preprocess_rows()
    if not torch.cuda.is_available():
        print("bench_caption_gpu: needs CUDA (no GPU visible); GPU rows skipped", file=sys.stderr)
        return cpu_rows + _skipped("skipped: needs CUDA")

    from hemblip.inference import Captioner
    from hemblip.model import build_model

    t0 = time.perf_counter()
    loaded = build_model("blip-base")
    kwargs = dict(
        device="cuda",
        batch_size=max(BATCH_SIZES),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
    )
    captioner = Captioner(loaded, **kwargs)
    build_s = time.perf_counter() - t0
    assert captioner.preprocess == "device", captioner.preprocess_fallback
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (max(BATCH_SIZES), 224, 224, 3), dtype=np.uint8)
    pixels = captioner.pixel_values(crops)
    rows: list[dict] = list(cpu_rows)
    captioner.generate(pixels[:8])  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for b in BATCH_SIZES:
        px = pixels[:b]
        with _UtilSampler(captioner.device.index or 0) as util:
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(_REPEATS):
                seq, _ = captioner.generate(px)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / _REPEATS
        assert seq.shape == (b, NEW_TOKENS + 1), seq.shape
        rows.append(
            {
                "name": f"caption cells/s (batch {b}, {NEW_TOKENS} tokens)",
                "value": b / dt,
                "unit": "cells/s",
                "goal": "higher",
            }
        )
        rows.append(
            {
                "name": f"GPU utilisation (batch {b})",
                "value": util.mean if util.mean is not None else "n/a (no pynvml)",
                "unit": "%",
                "goal": "higher",
            }
        )
    rows.append(
        {
            "name": "peak GPU memory",
            "value": torch.cuda.max_memory_allocated() / 2**30,
            "unit": "GiB",
            "goal": "lower",
        }
    )
    b = max(BATCH_SIZES)
    for _ in range(3):  # warm-up of the device resize kernels
        captioner.pixel_values(crops)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(_REPEATS):
        captioner.pixel_values(crops)
    torch.cuda.synchronize()
    rows.append(
        {
            "name": f"device preprocessing on GPU, ms/crop (224->384 px, batch {b})",
            "value": (time.perf_counter() - t) / _REPEATS / b * 1e3,
            "unit": "ms",
            "goal": "lower",
        }
    )
    for cap in (captioner, Captioner(loaded, preprocess="processor", **kwargs)):
        t = time.perf_counter()
        results = cap.caption(crops)  # uint8 crops -> preprocessing -> generate -> parsed captions
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        assert len(results) == b
        rows.append(
            {
                "name": f"end-to-end cells/s ({cap.preprocess} preprocessing, batch {b})",
                "value": b / dt,
                "unit": "cells/s",
                "goal": "higher",
            }
        )
    rows.append(
        {"name": "model build + load to GPU", "value": build_s, "unit": "s", "goal": "lower"}
    )
    rows.append({"name": "device", "value": torch.cuda.get_device_name(0), "unit": "", "goal": ""})
    return rows


if __name__ == "__main__":
    for row in run():
        print(f"{row['name']}: {row['value']} {row['unit']}")
