"""The done-set index (``OUTPUT/_index/done.parquet``): read instead of every ``slides/`` file,
never trusted past what the listing of ``slides/`` confirms (unit tier, local storage)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_helpers import InjectedFault, chunk_rows, injected_fault

from pipeline.job.ledger import DoneIndex
from pipeline.job.storage import storage_for
from pipeline.job.writer import OutputWriter

pytestmark = pytest.mark.unit
DAY = "2026-01-02"


def _writer(out: Path, run_id: str = "r1", day: str = DAY) -> OutputWriter:
    return OutputWriter(storage_for(str(out)), str(out), run_id, day, "v1")


def _index(out: Path) -> DoneIndex:
    return DoneIndex(storage_for(str(out)), str(out)).refresh()


def _rows(ids, status="ok", cls=None):
    cells, slides = chunk_rows(ids)
    for s in slides:
        s.update(status=status, failure_class=cls)
        if status != "ok":
            s["cell_count"] = 0
    return (cells if status == "ok" else []), slides


def test_index_is_written_then_read_without_reading_slides_files(tmp_path):
    out = tmp_path / "out"
    w = _writer(out)
    w.commit_chunk(*_rows(["s1", "s2"]))
    w.commit_chunk(*_rows(["s3"], "failed", "slide"))
    w.commit_chunk(*_rows(["s4"], "failed", "storage"))
    assert w.done_slides("v1", update_index=True) == {"s1", "s2", "s3"}
    assert (out / "_index" / "done.parquet").is_file()
    idx = _index(out)
    assert idx.reads == 0  # everything came from the index
    assert idx.done("v1") == {"s1", "s2", "s3"} and idx.done("v1", retry_failed=True) == {
        "s1",
        "s2",
    }
    assert idx.done("v2") == set()


def test_index_rebuilt_when_missing_or_corrupt(tmp_path):
    out = tmp_path / "out"
    w = _writer(out)
    w.commit_chunk(*_rows(["s1"]))
    w.update_index()
    (out / "_index" / "done.parquet").unlink()
    idx = _index(out)
    assert idx.reads == 1 and idx.done("v1") == {"s1"}
    (out / "_index" / "done.parquet").write_bytes(b"PAR1 not parquet")
    assert w.done_slides("v1", update_index=True) == {"s1"}
    assert _index(out).reads == 0  # repaired on disk
    # A Parquet file of another shape is not an index either.
    buf = io.BytesIO()
    pq.write_table(pa.table({"slide_id": ["forged"]}), buf)
    (out / "_index" / "done.parquet").write_bytes(buf.getvalue())
    idx = _index(out)
    assert idx.done("v1") == {"s1"} and any("not a done index" in n for n in idx.notes)


def test_dry_run_reads_but_never_writes_the_index(tmp_path):
    out = tmp_path / "out"
    _writer(out).commit_chunk(*_rows(["s1"]))
    assert _writer(out).done_slides("v1") == {"s1"}
    assert not (out / "_index").exists()


@pytest.mark.parametrize("point", ["after_journal", "mid_publish"])
def test_index_consistent_after_crash_between_journal_and_publish(tmp_path, point):
    out = tmp_path / "out"
    w = _writer(out)
    with injected_fault(1, point):
        w.commit_chunk(*_rows(["s1"]))
        with pytest.raises(InjectedFault):
            w.commit_chunk(*_rows(["s2", "s3"]))
    # The next run: index first (as a dry run would), then recovery under the lease, then again.
    w2 = _writer(out, "r2", "2026-01-03")
    assert w2.done_slides("v1", update_index=True) == {"s1"}
    rec = w2.recover()
    assert len(rec.rolled_forward) == 1
    assert w2.done_slides("v1", update_index=True) == {"s1", "s2", "s3"}
    assert _index(out).reads == 0


def test_index_drops_rolled_back_and_replaced_files(tmp_path):
    out = tmp_path / "out"
    w = _writer(out)
    w.commit_chunk(*_rows(["s1"]))
    w.commit_chunk(*_rows(["s2"]))
    w.update_index()
    slides = sorted((out / "slides").rglob("part-*.parquet"))
    # A chunk rolled back (its slides file deleted) is no longer done.
    gone = [p for p in slides if pq.read_table(p).column("slide_id").to_pylist() == ["s2"]][0]
    gone.unlink()
    idx = _index(out)
    assert idx.done("v1") == {"s1"} and any("dropped 1" in n for n in idx.notes)
    # A file replaced under the same name (re-committed chunk, now failed transiently) is re-read.
    kept = [p for p in slides if p != gone][0]
    buf = io.BytesIO()
    t = pq.read_table(kept)
    t = t.set_column(t.schema.get_field_index("status"), "status", pa.array(["failed"]))
    pq.write_table(t, buf)
    kept.write_bytes(buf.getvalue())
    os.utime(kept, ns=(1, 1))  # a different mtime: a different local ETag
    idx = _index(out)
    assert idx.reads == 1 and idx.done("v1") == set()
