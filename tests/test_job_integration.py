"""The nightly job end to end on the session's local Ray cluster and moto S3 server: full run with
a corrupt and a flaky slide, incremental re-runs, kill mid-publish then re-run (exact cell set),
empty archive, archive of non-slide objects only, dry run."""

from __future__ import annotations

import pytest
from faultproxy import FaultProxy
from job_helpers import (
    CORRUPT,
    InjectedFault,
    expected_cell_ids,
    injected_fault,
    job_config,
    new_bucket,
    put,
    read_table,
    visible_files,
)

from pipeline.job import run_job
from pipeline.schema import CELL_SCHEMA, RUN_SCHEMA, SLIDE_SCHEMA

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    from pipeline.samples import build_sample_slides

    return build_sample_slides(tmp_path_factory.mktemp("job-samples"))


def _seed(endpoint, samples, corrupt=True, extras=True):
    bucket = new_bucket(endpoint)
    for s in samples:
        put(endpoint, bucket, "slides/" + s.path.name, s.path)
        if extras:
            put(endpoint, bucket, "slides/truth/" + s.truth_path.name, s.truth_path)
    if corrupt:
        put(endpoint, bucket, "slides/corrupt.svs", CORRUPT)
    if extras:
        put(endpoint, bucket, "slides/README.txt", b"an archive\n")
    return bucket


def _cells_by_slide(cfg):
    t = read_table(cfg, "cells")
    out: dict[str, list[str]] = {}
    if t is None:
        return out
    for uri, cid in zip(t.column("slide_uri").to_pylist(), t.column("cell_id").to_pylist()):
        out.setdefault(uri, []).append(cid)
    return out


def _assert_schema(table, schema):
    assert table.schema.names == schema.names
    for f in schema:
        assert table.schema.field(f.name).type == f.type, f.name


def test_full_run_failures_and_incremental_reruns(s3_server, ray_cluster, samples):
    bucket = _seed(s3_server, samples)
    local = {s.path.name: s.path for s in samples}
    flaky = samples[-1].path.name
    with FaultProxy(s3_server).start() as proxy:
        cfg = job_config(proxy.url, bucket, s3_max_attempts=2)
        expected = expected_cell_ids(cfg, local)
        # Every GET of one slide answers 503: its transfer fails after the retries.
        proxy.add("503", op=("get", "ranged_get"), path=rf"/slides/{flaky}$")
        first = run_job(cfg)
        proxy.clear()
        by_uri = {r["slide_uri"]: r for r in first.slides}
        assert (first.listed, first.ok, first.failed, first.skipped) == (4, 2, 2, 0)
        assert len(first.ignored) == 1 + len(samples)  # README.txt + truth sidecars
        # 2 of 4 failed > the default 0.1: the run finishes, commits the good slides, exits 1.
        assert first.status == "threshold_exceeded" and first.exit_code == 1
        corrupt = by_uri[f"s3://{bucket}/slides/corrupt.svs"]
        assert corrupt["status"] == "failed" and corrupt["reason"].startswith("SlideOpenError: ")
        assert f"s3://{bucket}/slides/corrupt.svs" in corrupt["reason"]
        flaky_row = by_uri[f"s3://{bucket}/slides/{flaky}"]
        assert flaky_row["reason"].startswith("StorageError: ") and "503" in flaky_row["reason"]

        cells = read_table(cfg, "cells")
        _assert_schema(cells, CELL_SCHEMA)
        got = _cells_by_slide(cfg)
        good = {u: ids for u, ids in expected.items() if not u.endswith(flaky)}
        assert {u: sorted(v) for u, v in got.items()} == {u: sorted(v) for u, v in good.items()}
        assert first.cells_written == cells.num_rows == sum(len(v) for v in good.values()) > 0
        row = cells.slice(0, 1).to_pylist()[0]
        assert (
            row["caption"]
            and row["run_id"] == first.run_id
            and row["model_version"] == first.model_version
        )
        assert row["thumbnail_jpeg"][:2] == b"\xff\xd8"
        assert row["schema_version"] and row["pipeline_version"]
        slides = read_table(cfg, "slides")
        _assert_schema(slides, SLIDE_SCHEMA)
        assert sorted(slides.column("status").to_pylist()) == ["failed", "failed", "ok", "ok"]
        runs = read_table(cfg, "runs")
        _assert_schema(runs, RUN_SCHEMA)
        assert runs.column("status").to_pylist() == ["threshold_exceeded"]

        # Second run: only the flaky slide (transient failure) is retried; the corrupt one is
        # settled (same bytes fail the same way) and the good ones are done.
        second = run_job(cfg)
        assert (second.ok, second.failed, second.skipped, second.exit_code) == (1, 0, 3, 0)
        got = _cells_by_slide(cfg)
        assert {u: sorted(v) for u, v in got.items()} == {u: sorted(v) for u, v in expected.items()}
        all_ids = read_table(cfg, "cells").column("cell_id").to_pylist()
        assert len(all_ids) == len(set(all_ids))

        # Third run: nothing new (no cells/slides files); only its own runs/ row.
        before = (
            visible_files(cfg, "cells"),
            visible_files(cfg, "slides"),
            visible_files(cfg, "runs"),
        )
        third = run_job(cfg)
        assert (third.ok, third.failed, third.skipped, third.cells_written) == (0, 0, 4, 0)
        after = (
            visible_files(cfg, "cells"),
            visible_files(cfg, "slides"),
            visible_files(cfg, "runs"),
        )
        assert after[:2] == before[:2] and len(after[2]) == len(before[2]) + 1
        dry = run_job(job_config(proxy.url, bucket, dry_run=True))
        assert dry.would_process == [] and dry.status == "dry_run"
        assert visible_files(cfg, "runs") == after[2]


def test_kill_mid_publish_then_rerun_yields_each_cell_once(ray_cluster, samples, tmp_path):
    """Local archive and local output (the S3 paths are covered above): crash after chunk 1 is
    committed, while chunk 2 is half published; the re-run completes chunk 2 and does slide 3."""
    archive = tmp_path / "archive"
    archive.mkdir()
    for s in samples:
        (archive / s.path.name).write_bytes(s.path.read_bytes())
    out = str(tmp_path / "out")
    local = {s.path.name: s.path for s in samples}
    cfg = job_config(None, "", input=str(archive), output=out, chunk_slides=1)
    expected = expected_cell_ids(cfg, local)
    with injected_fault(1, "mid_publish"), pytest.raises(InjectedFault):
        run_job(cfg)
    # Chunk 1 is committed; chunk 2 has its cells visible but not its slides row (journal pending).
    assert len(visible_files(cfg, "slides")) == 1 and len(visible_files(cfg, "cells")) == 2
    assert any((tmp_path / "out" / "_journal").iterdir())

    rerun = run_job(job_config(None, "", input=str(archive), output=out, chunk_slides=1))
    assert len(rerun.recovery.rolled_forward) == 1
    assert (rerun.ok, rerun.skipped, rerun.exit_code) == (1, 2, 0)
    got = _cells_by_slide(cfg)
    assert {u: sorted(v) for u, v in got.items()} == {u: sorted(v) for u, v in expected.items()}
    ids = read_table(cfg, "cells").column("cell_id").to_pylist()
    assert len(ids) == len(set(ids)) == sum(len(v) for v in expected.values())
    assert read_table(cfg, "slides").column("bytes_read").to_pylist() == [None] * 3  # read in place
    assert not any((tmp_path / "out" / "_journal").iterdir())
    assert not list((tmp_path / "out" / "_staging").rglob("*.parquet"))


def test_empty_archive(s3_server):
    bucket = new_bucket(s3_server)
    cfg = job_config(s3_server, bucket)
    result = run_job(cfg)
    assert (result.listed, result.ok, result.failed, result.exit_code, result.status) == (
        0,
        0,
        0,
        0,
        "ok",
    )
    assert read_table(cfg, "cells") is None and read_table(cfg, "slides") is None
    assert read_table(cfg, "runs").column("slides_listed").to_pylist() == [0]


def test_archive_of_non_slide_objects(s3_server):
    bucket = new_bucket(s3_server)
    put(s3_server, bucket, "slides/notes.txt", b"hello")
    put(s3_server, bucket, "slides/sub/labels.json", b"{}")
    put(s3_server, bucket, "slides/.upload.svs", b"partial")
    cfg = job_config(s3_server, bucket)
    result = run_job(cfg)
    assert (result.listed, result.exit_code) == (0, 0)
    assert sorted(u.rsplit("/", 1)[-1] for u in result.ignored) == [
        ".upload.svs",
        "labels.json",
        "notes.txt",
    ]
    assert read_table(cfg, "cells") is None
