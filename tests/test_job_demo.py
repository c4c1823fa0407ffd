"""``python -m pipeline demo`` end to end (its own moto server; the session's Ray cluster)."""

from __future__ import annotations

import os

import pytest

from pipeline.job.demo import _prepare_output, run_demo

pytestmark = pytest.mark.integration


def test_demo_runs_twice_and_second_run_is_empty(ray_cluster, tmp_path):
    lines: list[str] = []
    out = tmp_path / "demo_output"
    result = run_demo(
        out, say=lines.append, caption_batch_size=8, model=os.environ.get("JOB_TEST_MODEL") or None
    )
    first, second = result.first, result.second
    assert (first.listed, first.ok, first.failed, first.exit_code) == (4, 3, 1, 0)
    assert first.cells_written > 0
    assert (second.ok, second.failed, second.skipped, second.cells_written) == (0, 0, 4, 0)
    text = "\n".join(lines)
    assert "corrupt.svs: SlideOpenError" in text and "4 non-slide objects ignored" in text
    assert f"outputs: {out.resolve()}" in text
    assert list((out / "cells").rglob("*.parquet")) and list((out / "runs").rglob("*.parquet"))
    # A later demo recreates its own output directory (checked before anything starts) ...
    _prepare_output(out)
    assert not (out / "cells").exists()
    # ... but never touches a directory it did not write.
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="was not written by the demo"):
        run_demo(other, say=lines.append)
    assert (other / "keep.txt").exists()
