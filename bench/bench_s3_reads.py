"""S3 bytes fetched by a detection pass ÷ slide bytes, with the remote TIFF backend (goal ≤ 0.3).

The slides are served by moto's S3 server on 127.0.0.1; each is opened with
:func:`pipeline.slides._remote_tiff.open_remote_slide` and run through
:func:`pipeline.detect.detect_slide` (scale from metadata, the detection level read in tiles, a
36 µm level-0 crop around every cell). Every byte the ranged GETs return is counted, the TIFF
header included. Staging the file, the job's fallback, costs 1.0 by definition.

Slides: the three sample slides (``pipeline.samples``: one WBC in every 640x480 field, about 40x
the WBC density of normal blood, so crops cover most of level 0) and the sparse ``smear`` slide
of ``bench_detect`` (12 x 12 fields, 3 WBCs: about normal blood's 1 WBC per ~700 red cells).
Run alone: ``python -m bench.bench_s3_reads``.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.slides import open_remote_slide

_BUCKET = "bench-s3-reads"


@contextmanager
def s3_client():
    """A boto3 client on a fresh moto S3 server on loopback (dummy credentials)."""
    import boto3

    from pipeline.job.demo import MotoServer

    with MotoServer() as server:
        client = boto3.client(
            "s3",
            endpoint_url=server.url,
            region_name="us-east-1",
            aws_access_key_id="bench-key-id",
            aws_secret_access_key="bench-secret-key",
        )
        yield client, server.url


def detect_remote(slide, config=None, source: str | None = None):
    """``detect_slide`` on an already-open slide (the caller closes it)."""
    from pipeline.detect import detect_slide

    return detect_slide(slide, config, source=source or slide.path)


def build_slides(out: Path) -> list[Path]:
    """The three sample slides and the sparse smear slide, written into ``out``."""
    from bench.bench_detect import _smear_slide
    from pipeline.samples import build_sample_slides

    paths = [s.path for s in build_sample_slides(out)]
    smear = out / "smear.tiff"
    _smear_slide(smear)
    return paths + [smear]


def run() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, s3_client() as (client, _):
        client.create_bucket(Bucket=_BUCKET)
        paths = build_slides(Path(tmp))
        per = {}
        costs: list[tuple[float, int, float]] = []  # (detection-level MP, cells, CPU s)
        # Warm-up: imports and the detector's first calls are not a per-slide cost.
        with open_remote_slide(client, _BUCKET, _upload(client, paths[0])) as slide:
            detect_remote(slide)
        for p in paths:
            _upload(client, p)
            t, cpu = time.perf_counter(), time.process_time()
            with open_remote_slide(client, _BUCKET, p.name) as slide:
                header = slide.bytes_fetched
                res = detect_remote(slide)
                fetched, requests = slide.bytes_fetched, slide.requests
                ds = slide.level_downsamples[res.info["detect_level"]]
            secs, cpu = time.perf_counter() - t, time.process_time() - cpu
            level_mp = res.info["width"] * res.info["height"] / ds**2 / 1e6
            costs.append((level_mp, len(res.records), cpu))
            size = os.path.getsize(p)
            per[p.name] = (fetched, size)
            print(
                f"{p.name}: {size:,} B object, fetched {fetched:,} B ({header:,} B header) in "
                f"{requests} GETs, {len(res.records)} cells, detection level {res.info['detect_level']} "
                f"({level_mp:.2f} MP), {secs:.1f} s wall, {cpu:.2f} CPU-s"
            )
            rows.append(
                {
                    "name": f"s3_bytes_ratio_{p.stem}",
                    "value": fetched / size,
                    "unit": "fetched/size",
                    "goal": "<= 0.3" if p.stem == "smear" else "",
                    "detail": f"{len(res.records)} cells, {requests} GETs, {header} B header",
                }
            )
        samples = [v for k, v in per.items() if k != "smear.tiff"]
        rows.append(
            {
                "name": "s3_bytes_ratio_sample_archive",
                "value": sum(f for f, _ in samples) / sum(s for _, s in samples),
                "unit": "fetched/size",
                "goal": "",
                "detail": "three sample slides; one WBC per 640x480 field, crops cover most of level 0",
            }
        )
        rows += _cost_model(client, paths[-1], costs)
    return rows


def _cost_model(client, smear: Path, costs: list[tuple[float, int, float]]) -> list[dict]:
    """Per-stage CPU costs for docs/scaling.md, from differences between runs in this process.

    ``big``: the sparse slide tiled 2 x 2 (4x the detection-level px, 4x the cells). With the
    dense sample slides (few px, many cells) the two differences to the sparse slide give the
    CPU-s per detection-level MP and per cell, both at the detector's own working resolution.
    Fetch + decode alone: reading the sparse slide's whole level 0 remotely.
    """
    import tifffile

    from pipeline import samples

    big = smear.with_name("big.tiff")
    level0 = tifffile.imread(smear, key=0)
    samples.write_pyramid(
        big, samples.pyramid(np.tile(level0, (2, 2, 1))), samples.BCCD_MPP, "generic-tiff"
    )
    del level0
    _upload(client, big)
    cpu = time.process_time()
    with open_remote_slide(client, _BUCKET, big.name) as slide:
        res = detect_remote(slide)
        ds = slide.level_downsamples[res.info["detect_level"]]
    cpu_b = time.process_time() - cpu
    mp_b, cells_b = res.info["width"] * res.info["height"] / ds**2 / 1e6, len(res.records)
    mp_s, cells_s, cpu_s = costs[-1]
    dense = costs[:-1]
    mp_d, cells_d, cpu_d = (sum(c[i] for c in dense) / len(dense) for i in range(3))
    per_mp, per_cell = np.linalg.solve(
        np.array([[mp_b - mp_s, cells_b - cells_s], [mp_d - mp_s, cells_d - cells_s]]),
        np.array([cpu_b - cpu_s, cpu_d - cpu_s]),
    )
    cpu = time.process_time()
    with open_remote_slide(client, _BUCKET, smear.name) as slide:
        w, h = slide.dimensions
        for y in range(0, h, 1024):
            for x in range(0, w, 1024):
                slide.read(0, (x, y, min(x + 1024, w), min(y + 1024, h)))
    read_per_mp = (time.process_time() - cpu) / (w * h / 1e6)
    print(
        f"cost model: {per_mp:.3f} CPU-s per detection-level MP, {per_cell:.4f} CPU-s per cell "
        f"(big {mp_b:.2f} MP {cells_b} cells {cpu_b:.2f} CPU-s; sparse {mp_s:.2f} MP {cells_s} cells "
        f"{cpu_s:.2f} CPU-s; dense {mp_d:.2f} MP {cells_d:.1f} cells {cpu_d:.2f} CPU-s); "
        f"{read_per_mp:.4f} CPU-s per level-0 MP fetched + decoded"
    )
    return [
        {
            "name": "detect_cpu_s_per_level_mp",
            "value": float(per_mp),
            "unit": "CPU-s/MP",
            "goal": "",
            "detail": "per MP of the pyramid level detection runs on (read + decode + detect)",
        },
        {
            "name": "detect_cpu_s_per_cell",
            "value": float(per_cell),
            "unit": "CPU-s/cell",
            "goal": "",
            "detail": "level-0 crop read + resample + morphometry + QC",
        },
        {
            "name": "remote_read_cpu_s_per_mp",
            "value": read_per_mp,
            "unit": "CPU-s/MP",
            "goal": "",
            "detail": "ranged GET + JPEG decode of level 0, 1024-px reads",
        },
    ]


def _upload(client, path: Path) -> str:
    client.upload_file(str(path), _BUCKET, path.name)
    return path.name


if __name__ == "__main__":
    for r in run():
        print(r)
