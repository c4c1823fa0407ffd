"""Workers write the cells; the driver only chooses staged files and commits them exactly once.

Unit tier: the real stages' functions without Ray (detect batch builders -> caption columns ->
:class:`pipeline.job.stage_write.WriteStage` writing real files under a local OUTPUT) feed
:func:`pipeline.job.run.consume`, including the overlapping files a re-executed task leaves.
Integration tier: one small local run on the session Ray cluster; every committed cells file
carries the ``host:pid`` of the worker process that wrote it, never the driver's.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from job_helpers import visible_cell_ids

from pipeline.job.listing import SlideRef
from pipeline.job.storage import S3Settings, storage_for
from pipeline.job.writer import OutputWriter, StagedCells, plan_bins, visible_parquet
from pipeline.schema import CELL_SCHEMA, DETECT_COLUMNS

unit = pytest.mark.unit
integration = pytest.mark.integration
DAY = "2026-01-02"
SID = "a" * 32


def _ref(sid: str = SID) -> SlideRef:
    return SlideRef(
        uri=f"s3://b/{sid[:4]}.svs", slide_id=sid, etag="e", size=10, parts=(), open_rel="x"
    )


def _detect_records(n: int) -> list[dict]:
    recs = []
    for i in range(n):
        r = {}
        for name, typ, *_ in DETECT_COLUMNS:
            t = str(typ)
            r[name] = i if t.startswith("int") else float(i) + 0.5 if t == "double" else "s"
        r.update(
            centroid_x=10.0 * i,
            centroid_y=5.0,
            qc_flags=["clumped"] if i % 2 else [],
            nc_ratio=None,
        )
        recs.append(r)
    return recs


def _captioned(batch: dict) -> dict:
    from pipeline.job.stage_caption import caption_columns

    idx = [i for i, k in enumerate(batch["kind"]) if k == "cell"]
    cells = [
        int(batch["centroid_x"][i] // 10) for i in idx
    ]  # the cell's own number: captions follow the cell
    results = [
        SimpleNamespace(
            caption=f"c{c}",
            mean_logprob=-0.5,
            cell_type="lymphocyte" if c % 2 else None,
            cell_type_confidence=None,
            case="healthy",
            attributes={"cell_size": "small"},
        )
        for c in cells
    ]
    return caption_columns(batch, idx, results, 0.01, 0.0)


def _cells(n: int, rows: list[int], sid: str = SID) -> dict:
    from pipeline.job.stage_detect import _cell_batch

    recs = _detect_records(n)
    crops = np.zeros((len(rows), 4, 4, 3), np.uint8)
    return _captioned(
        _cell_batch(sid, _ref(sid), crops, [recs[i] for i in rows], [b"\xff\xd8jpeg"] * len(rows))
    )


def _outcome(n: int, sid: str = SID, status: str = "ok") -> dict:
    from pipeline.job.stage_detect import DetectSettings, _new_outcome, _slide_batch

    out = _new_outcome(_ref(sid))
    out.update(status=status, cell_count=n if status == "ok" else 0)
    return _captioned(_slide_batch(_ref(sid), DetectSettings(S3Settings(), crop_px=4), out))


def _concat(*batches: dict) -> dict:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _stage(out: Path):
    from pipeline.job.stage_write import WriteStage

    base = {
        "run_id": "r1",
        "model_id": "m",
        "model_version": "v1",
        "pipeline_version": "p",
        "schema_version": "1",
    }
    return WriteStage(str(out), S3Settings(), "r1", base)


def _consume(out: Path, batches: list[dict], todo: list[SlideRef], lines: list[str] | None = None):
    from pipeline.job.run import Chunker, consume

    writer = OutputWriter(storage_for(str(out)), str(out), "r1", DAY, "v1")
    cfg = SimpleNamespace(chunk_slides=16, chunk_cells=20000)
    chunker = Chunker(writer, cfg, "r1", "v1", (lines if lines is not None else []).append)
    consume(batches, todo, "r1", "v1", chunker, (lines if lines is not None else []).append)
    return writer, chunker


@unit
def test_write_stage_writes_typed_cells_and_returns_metadata_only(tmp_path):
    out = tmp_path / "out"
    meta = _stage(out)(_concat(_cells(5, [0, 1, 2, 3, 4]), _outcome(5)))
    assert list(meta["kind"]) == ["file", "slide"]
    assert "caption" not in meta and "thumbnail" not in meta  # nothing per cell but 16-byte ids
    assert len(meta["cell_ids"][0]) == 5 * 16 and int(meta["n_cells"][0]) == 5
    uri = str(meta["uri"][0])
    assert uri.startswith(str(out / "_staging" / "r1" / "w" / SID))
    t = pq.read_table(uri)
    assert t.schema.equals(CELL_SCHEMA, check_metadata=False)
    row = t.to_pylist()[1]
    assert (
        row["qc_flags"] == ["clumped"] and row["nc_ratio"] is None and row["cell_size"] == "small"
    )
    assert row["thumbnail_jpeg"] == b"\xff\xd8jpeg" and row["run_id"] == "r1"
    tag = pq.read_schema(uri).metadata[b"hemblip.writer"].decode()
    assert tag.endswith(f":{os.getpid()}")
    # Deterministic: the same rows again overwrite the same file.
    again = _stage(out)(_cells(5, [4, 3, 2, 1, 0]))
    assert str(again["uri"][0]) == uri


@unit
def test_reexecuted_task_overlapping_files_commit_each_cell_once(tmp_path):
    out = tmp_path / "out"
    stage = _stage(out)
    n = 10
    # Attempt 1 wrote cells 0-5 before its worker died; attempt 2 re-batched all 10 differently.
    first = stage(_cells(n, list(range(6))))
    second = stage(_cells(n, [3, 4, 5, 6, 7, 8, 9]))
    third = stage(_cells(n, [0, 1, 2]))
    outcome = stage(_outcome(n))
    lines: list[str] = []
    writer, chunker = _consume(out, [first, second, outcome, third], [_ref()], lines)
    ids = visible_cell_ids(out)
    assert len(ids) == n and len(set(ids)) == n
    assert chunker.all_slides[0]["cell_count"] == n and writer.committed[0].cells == n
    assert chunker.all_slides[0]["cell_types"] == {"lymphocyte": 5, "(none)": 5}
    writer.sweep_staging()
    assert not [p for p in (out / "_staging").rglob("*") if p.is_file()]


@unit
def test_repeated_metadata_and_late_duplicates_are_ignored(tmp_path):
    out = tmp_path / "out"
    stage = _stage(out)
    a = stage(_concat(_cells(4, [0, 1, 2, 3]), _outcome(4)))
    late = stage(_cells(4, [0, 1]))  # a re-execution reporting after the slide completed
    writer, _ = _consume(out, [a, a, late], [_ref()])
    assert len(visible_cell_ids(out)) == 4 and len(writer.committed) == 1


@unit
def test_incomplete_slide_is_an_error_not_a_silent_drop(tmp_path):
    out = tmp_path / "out"
    stage = _stage(out)
    batches = [stage(_cells(6, [0, 1, 2])), stage(_cells(6, [2, 3, 4])), stage(_outcome(6))]
    with pytest.raises(Exception, match="1 slides produced no outcome"):
        _consume(out, batches, [_ref()])
    assert visible_cell_ids(out) == []


@unit
def test_failed_slide_commits_no_cells(tmp_path):
    out = tmp_path / "out"
    stage = _stage(out)
    batches = [stage(_cells(3, [0, 1])), stage(_outcome(3, status="failed"))]
    _, chunker = _consume(out, batches, [_ref()])
    assert visible_cell_ids(out) == [] and chunker.all_slides[0]["status"] == "failed"


@unit
@pytest.mark.parametrize(
    ("files", "count", "expect"),
    [
        ({"a": [1, 2], "b": [3]}, 3, {"a", "b"}),
        ({"a": [1, 2], "b": [2, 3], "c": [1]}, 3, {"b", "c"}),  # greedy "a" first would be stuck
        ({"a": [1, 2], "b": [2, 3]}, 3, None),  # every cover overlaps: wait for more files
        ({"a": [1, 2], "b": [2]}, 3, None),  # a cell never seen
        ({"a": [1], "b": [1]}, 2, None),  # enough rows, too few distinct cells
        ({}, 0, set()),
    ],
)
def test_choose_cover(files, count, expect):
    from pipeline.job.run import choose_cover

    blobs = {u: b"".join(i.to_bytes(16, "big") for i in ids) for u, ids in files.items()}
    got = choose_cover(blobs, count)
    assert (set(got) if got is not None else None) == expect


@unit
def test_small_staged_files_are_compacted_up_to_the_target(tmp_path):
    out = tmp_path / "out"
    stage = _stage(out)
    metas = [stage(_cells(12, [i, i + 1, i + 2])) for i in range(0, 12, 3)]
    staged = [
        StagedCells(str(m["uri"][0]), int(m["n_cells"][0]), int(m["nbytes"][0])) for m in metas
    ]
    size = max(f.nbytes for f in staged)
    assert [len(b) for b in plan_bins(staged, 2 * size + 1)] == [2, 2]
    assert [len(b) for b in plan_bins(staged, 1)] == [
        1,
        1,
        1,
        1,
    ]  # a file over the target is its own bin
    w = OutputWriter(
        storage_for(str(out)), str(out), "r1", DAY, "v1", target_file_mb=(2 * size + 1) / 2**20
    )
    slide = {
        "slide_id": SID,
        "slide_uri": "u",
        "status": "ok",
        "cell_count": 12,
        "model_version": "v1",
        "run_id": "r1",
    }
    c = w.commit_chunk(staged, [slide])
    cells = sorted(visible_parquet(storage_for(str(out)), str(out), "cells"))
    assert len(cells) == 2 and all(p.endswith(("-0000.parquet", "-0001.parquet")) for p in cells)
    assert c.cells == 12 and len(set(visible_cell_ids(out))) == 12
    # The inputs of the compaction are gone; nothing staged is left.
    assert not [p for p in (out / "_staging").rglob("*.parquet")]


@integration
def test_job_cells_files_are_written_by_workers_not_the_driver(ray_cluster, tmp_path):
    from fault_fixtures import assert_outputs_consistent, make_small_slides, run_job_collect

    from pipeline.job.stage_write import WRITER_KEY

    paths = make_small_slides(tmp_path / "in", 3)
    out = tmp_path / "out"
    res = run_job_collect(input=str(tmp_path / "in"), output=str(out), chunk_slides=2)
    assert res.exit_code == 0 and res.ok == len(paths) and res.cells_written > 0
    st = storage_for(str(out))
    files = visible_parquet(st, str(out), "cells")
    assert len(files) == res.chunks  # one compacted file per chunk (default 128 MiB target)
    for uri in files:
        meta = pq.read_schema(io.BytesIO(st.read_bytes(uri))).metadata or {}
        assert WRITER_KEY in meta, f"{uri}: not written by the write stage"
        assert not meta[WRITER_KEY].decode().endswith(f":{os.getpid()}"), (
            f"{uri}: written by the driver"
        )
    assert_outputs_consistent(str(out))
    assert not [p for p in (out / "_staging").rglob("*") if p.is_file()]
    assert json.loads(json.dumps(res.slides[0]["cell_types"])) == res.slides[0]["cell_types"]
