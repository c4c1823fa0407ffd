"""Load benchmark: ≥ 200 small slides from S3 (moto's server on loopback) in one run of the
nightly job on a local Ray cluster; reports failures, peak RSS of the driver and of the Ray worker
processes, and throughput.

``python bench/bench_load.py [N]`` prints the rows; ``python -m bench`` calls :func:`run`.
Each slide is one real BCCD smear field (640x480 px, 1-3 WBCs, MIT licence, see
``pipeline/sample_data/ATTRIBUTION.md``) written as a 2-level pyramidal TIFF; the caption model
is a randomly initialised ``tiny`` HemBLIP checkpoint (the pipeline's cost, not caption quality,
is what is measured). The helpers live in ``tests/fault_fixtures.py`` (shared with the tests).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["run", "N_SLIDES"]

N_SLIDES = 200
_REPO = Path(__file__).resolve().parents[1]


def _moto_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto server did not start within 60 s")


def run(n_slides: int = N_SLIDES) -> list[dict]:
    """Rows ``{name, value, unit, goal}`` of one load run over ``n_slides`` slides."""
    sys.path.insert(0, str(_REPO / "tests"))
    from fault_fixtures import load_run

    for k, v in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }.items():
        os.environ.setdefault(k, v)
    import ray

    proc, endpoint = _moto_server()
    started_ray = False
    try:
        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            started_ray = True
        with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
            m = load_run(endpoint, n_slides, tmp, chunk_slides=16)
    finally:
        if started_ray:
            ray.shutdown()
        proc.terminate()
        proc.wait(10)
    res = m["result"]
    return [
        {
            "name": "load: slides processed in one run",
            "value": res.ok,
            "unit": "slides",
            "goal": f">= {n_slides}",
        },
        {"name": "load: failed slides", "value": res.failed, "unit": "slides", "goal": "== 0"},
        {"name": "load: cells written", "value": m["cells"], "unit": "cells", "goal": "each once"},
        {"name": "load: wall time", "value": round(m["seconds"], 1), "unit": "s", "goal": ""},
        {
            "name": "load: throughput",
            "value": round(m["slides_per_hour"]),
            "unit": "slides/h",
            "goal": "",
        },
        {
            "name": "load: throughput (cells)",
            "value": round(m["cells_per_s"], 2),
            "unit": "cells/s",
            "goal": "",
        },
        {
            "name": "load: peak RSS driver",
            "value": round(m["driver_peak_mib"]),
            "unit": "MiB",
            "goal": "< 3072",
        },
        {
            "name": "load: peak RSS largest Ray worker",
            "value": round(m["worker_peak_mib"]),
            "unit": "MiB",
            "goal": "< 3072",
        },
        {
            "name": "load: peak RSS all Ray workers",
            "value": round(m["workers_total_peak_mib"]),
            "unit": "MiB",
            "goal": "",
        },
        {
            "name": "load: Ray worker processes seen",
            "value": m["workers_seen"],
            "unit": "processes",
            "goal": "",
        },
    ]


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else N_SLIDES
    for row in run(n):
        print(f"{row['name']:<40} {row['value']:>10} {row['unit']:<10} {row['goal']}")
