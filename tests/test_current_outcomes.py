"""A slide's current outcome survives a re-run that skipped everything, until the slide is fixed.

The nightly job writes no ``slides/`` row for a slide it skips (done, or failed for a reason of its
own bytes), so "failures of the last run" is empty right after such a run (the demo's second run)
while the corrupt slide is still corrupt. ``current_slides`` (latest non-skipped row per slide URI)
and everything built on it (the README example, the report's failure table) must keep it listed
until a later ``ok`` row supersedes it: the same ``slide_id`` retried, or the same URI with new bytes.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.query import query_arrow
from pipeline.report import build_report
from pipeline.schema import RUN_SCHEMA, SLIDE_SCHEMA

sys.path.insert(0, str(Path(__file__).parent))
from outputs_fixture import build_outputs  # noqa: E402
from test_query import _examples  # noqa: E402

pytestmark = pytest.mark.unit

RUN3, DATE3 = "run-20261129-000001", "2026-11-29"
RUN4, DATE4 = "run-20261130-000001", "2026-11-30"
BROKEN, TRUNCATED = "s3://smears/archive/broken-01.svs", "s3://smears/archive/truncated-01.svs"


def _write(
    root: Path, table: str, date: str, run_id: str, rows: list[dict], schema: pa.Schema
) -> None:
    d = root / table / f"run_date={date}"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), d / f"part-{run_id}.parquet")


def _run_row(fx, run_id: str, day: int, ok: int, failed: int, skipped: int) -> dict:
    t = datetime(2026, 11, day, 2, 0, tzinfo=UTC)
    return dict(
        fx.runs[-1],
        run_id=run_id,
        started_at=t,
        finished_at=t.replace(minute=2),
        slides_listed=ok + failed + skipped,
        slides_ok=ok,
        slides_failed=failed,
        slides_skipped=skipped,
        cells_written=0,
    )


def _skip_everything_run(fx) -> None:
    """Run 3: every slide is skipped (already done, or failed for its own bytes): a runs row, no slides rows."""
    _write(fx.root, "runs", DATE3, RUN3, [_run_row(fx, RUN3, 29, 0, 0, 5)], RUN_SCHEMA)


@pytest.fixture
def skipped_after_failures(tmp_path):
    fx = build_outputs(tmp_path / "out")
    _skip_everything_run(fx)
    return fx


def _failures(root: Path) -> list[tuple[str, str]]:
    rows = query_arrow(str(root), _examples()["current_failures"]).to_pylist()
    return [(r["slide_uri"], r["reason"]) for r in rows]


def test_readme_failures_example_survives_a_skip_only_run(skipped_after_failures):
    fx = skipped_after_failures
    latest_run = (
        query_arrow(str(fx.root), "SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1")
        .column(0)[0]
        .as_py()
    )
    assert latest_run == RUN3
    got = _failures(fx.root)
    assert [u for u, _ in got] == [BROKEN, TRUNCATED]
    assert "not a TIFF file" in got[0][1] and "SlideReadError" in got[1][1]


def test_fixed_slides_leave_the_failure_list(skipped_after_failures):
    fx = skipped_after_failures
    t = datetime(2026, 11, 30, 2, 0, tzinfo=UTC)
    trunc = next(s for s in fx.slides if s["slide_uri"] == TRUNCATED)
    broken = next(s for s in fx.slides if s["slide_uri"] == BROKEN)
    rows = [
        # the same bytes retried (--retry-failed) and read this time: same slide_id, ok
        dict(
            trunc,
            status="ok",
            reason=None,
            failure_class=None,
            run_id=RUN4,
            finished_at=t.replace(minute=3),
        ),
        # broken-01 replaced by a good copy: same URI, new etag, hence a new slide_id
        dict(
            broken,
            slide_id="f" * 32,
            slide_etag="etag-fixed",
            status="ok",
            reason=None,
            failure_class=None,
            run_id=RUN4,
            finished_at=t.replace(minute=4),
        ),
    ]
    _write(fx.root, "slides", DATE4, RUN4, rows, SLIDE_SCHEMA)
    _write(fx.root, "runs", DATE4, RUN4, [_run_row(fx, RUN4, 30, 2, 0, 3)], RUN_SCHEMA)
    assert _failures(fx.root) == []
    cur = query_arrow(
        str(fx.root), "SELECT slide_uri, slide_id, status FROM current_slides ORDER BY slide_uri"
    ).to_pylist()
    assert {r["slide_uri"]: r["status"] for r in cur} == {
        BROKEN: "ok",
        TRUNCATED: "ok",
        "s3://smears/archive/healthy-01.svs": "ok",
        "s3://smears/archive/aml-01.svs": "ok",
        "s3://smears/archive/cll-01.svs": "ok",
    }
    assert (
        next(r for r in cur if r["slide_uri"] == BROKEN)["slide_id"] == "f" * 32
    )  # one row per URI


def test_a_skip_is_not_an_outcome_but_a_slide_with_only_skips_is_kept(skipped_after_failures):
    fx = skipped_after_failures
    # --record-skipped writes skipped rows: they must not hide the failure they follow
    skipped = [
        dict(
            s,
            status="skipped",
            reason="already settled with model 0123456789abcdef",
            failure_class=None,
            run_id=RUN4,
            finished_at=datetime(2026, 11, 30, 2, 1, tzinfo=UTC),
        )
        for s in fx.slides
        if s["run_id"] == fx.runs[-1]["run_id"]
    ]
    skipped.append(
        dict(skipped[0], slide_uri="s3://smears/archive/only-skipped.svs", slide_id="e" * 32)
    )
    _write(fx.root, "slides", DATE4, RUN4, skipped, SLIDE_SCHEMA)
    assert [u for u, _ in _failures(fx.root)] == [BROKEN, TRUNCATED]
    cur = {
        r["slide_uri"]: r
        for r in query_arrow(str(fx.root), "SELECT * FROM current_slides").to_pylist()
    }
    assert cur["s3://smears/archive/healthy-01.svs"]["status"] == "ok"
    assert (
        cur["s3://smears/archive/only-skipped.svs"]["status"] == "skipped"
    )  # nothing silently dropped
    assert len(cur) == 6


def test_report_failure_table_survives_a_skip_only_run(skipped_after_failures, tmp_path):
    fx = skipped_after_failures
    out = tmp_path / "report.html"
    build_report(str(fx.root), out, thumb_px=0)
    text = out.read_text(encoding="utf-8")
    runs = text[
        text.index("<section id='runs'>") : text.index(
            "</section>", text.index("<section id='runs'>")
        )
    ]
    assert re.search(r"failing now[^<]*: 2</h3>", runs), runs[-600:]
    assert "broken-01.svs" in runs and "truncated-01.svs" in runs and "not a TIFF file" in runs
    # the per-slide status table shows the current outcome, not the skip
    slides = text[text.index("<section id='slides'>") :]
    assert "skipped" not in slides[: slides.index("</table>")]
