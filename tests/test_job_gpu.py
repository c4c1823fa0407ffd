"""The nightly job's caption actors on a GPU: two actors sharing one GPU (0.5 each)."""

from __future__ import annotations

import os

import pytest

from pipeline.job import JobConfig, run_job
from pipeline.job.plan import resolve_gpus

pytestmark = pytest.mark.gpu


def test_fractional_gpu_actors(ray_cluster, tmp_path):
    from pipeline.samples import build_sample_slides

    assert resolve_gpus(None) == 1.0  # the default on a cluster with GPUs
    archive = tmp_path / "archive"
    build_sample_slides(archive)
    cfg = JobConfig(
        input=str(archive),
        output=str(tmp_path / "out"),
        caption_gpus_per_actor=0.5,
        caption_min_actors=1,
        caption_max_actors=2,
        caption_batch_size=16,
        model=os.environ.get("JOB_TEST_MODEL") or None,
    )
    result = run_job(cfg)
    assert (result.ok, result.failed, result.exit_code) == (3, 0, 0) and result.cells_written > 0
