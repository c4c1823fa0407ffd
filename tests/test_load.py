"""Load: an archive of 40 small slides in one run on this 2-core machine (the ≥ 200-slide run is
``bench/bench_load.py``, ~5 min): no failures, every cell once, bounded memory.

Figures are printed (``pytest -s``); speed is judged by the benchmark, not here.
"""

from __future__ import annotations

import pytest
from fault_fixtures import assert_outputs_consistent, cell_ids, load_run, read_table

pytestmark = pytest.mark.integration

N_SLIDES = 40
#: Bounds on a 2-core / 24 GiB machine: the driver holds one chunk of rows at a time, each worker
#: one slide (or one caption batch); neither may grow with the archive.
DRIVER_MAX_MIB = 3072
WORKER_MAX_MIB = 3072


def test_40_slides_one_run(s3_server, ray_cluster, tmp_path):
    m = load_run(s3_server, N_SLIDES, tmp_path, chunk_slides=8)
    res = m["result"]
    print(
        f"\n{N_SLIDES} slides: {m['seconds']:.1f} s, {m['slides_per_hour']:.0f} slides/h, "
        f"{m['cells_per_s']:.2f} cells/s, {m['cells']} cells; peak RSS driver "
        f"{m['driver_peak_mib']:.0f} MiB, largest worker {m['worker_peak_mib']:.0f} MiB, "
        f"all workers {m['workers_total_peak_mib']:.0f} MiB ({m['workers_seen']} worker processes)"
    )
    assert res.exit_code == 0 and res.ok == N_SLIDES and res.failed == 0
    ids = cell_ids(m["output"], s3_server)
    assert len(ids) == len(set(ids)) == res.cells_written >= N_SLIDES
    slides = read_table(m["output"], "slides", s3_server)
    assert slides.num_rows == N_SLIDES and set(slides.column("status").to_pylist()) == {"ok"}
    assert_outputs_consistent(m["output"], s3_server)
    assert res.chunks == N_SLIDES // 8  # outputs are chunked, not one file per slide
    assert 0 < m["driver_peak_mib"] < DRIVER_MAX_MIB
    assert 0 < m["worker_peak_mib"] < WORKER_MAX_MIB
