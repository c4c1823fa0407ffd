"""Unit tests of the nightly job's pure parts: config, listing/grouping, identity, scratch
confinement, the writer's commit protocol and its recovery (local storage, no Ray, no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from job_helpers import InjectedFault, chunk_rows, injected_fault, visible_cell_ids

from pipeline.errors import ConfigError, StorageError
from pipeline.job.config import JobConfig, load_config
from pipeline.job.identity import cell_id, chunk_name, slide_id
from pipeline.job.listing import list_slides
from pipeline.job.stage_detect import confined_path, ref_from_json, ref_to_json
from pipeline.job.storage import storage_for
from pipeline.job.writer import OutputWriter, visible_parquet

pytestmark = pytest.mark.unit


# -- config ---------------------------------------------------------------------------------
def test_config_requires_input_and_output():
    with pytest.raises(ConfigError, match="--input"):
        JobConfig(output="/tmp/out")
    with pytest.raises(ConfigError, match="--output"):
        JobConfig(input="s3://b/p/")


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("max_failed_fraction", 1.5, "--max-failed-fraction"),
        ("caption_batch_size", 0, "--caption-batch-size"),
        ("caption_max_actors", 0, "--caption-max-actors"),
        ("caption_gpus_per_actor", -0.5, "--caption-gpus-per-actor"),
        ("caption_gpus_per_actor", 1.5, "--caption-gpus-per-actor"),
        ("chunk_slides", 0, "--chunk-slides"),
        ("crop_um", 0.0, "--crop-um"),
        ("mpp", -1.0, "--mpp"),
        ("run_id", "a/b", "--run-id"),
    ],
)
def test_config_checks_name_the_flag(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        JobConfig(input="in", output="out", **{field: value})


def test_config_rejects_other_schemes():
    with pytest.raises(ConfigError, match="--input"):
        JobConfig(input="gs://bucket/x", output="out")


def test_fractional_gpus_and_extension_normalisation():
    cfg = JobConfig(
        input="in", output="out", caption_gpus_per_actor=0.25, extensions=("SVS", ".Tiff")
    )
    assert cfg.caption_gpus_per_actor == 0.25
    assert cfg.extensions == (".svs", ".tiff")


def test_yaml_then_cli_override(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text(
        "input: s3://archive/slides/\noutput: s3://out/x/\ncaption-batch-size: 8\nchunk_slides: 4\n"
    )
    cfg = load_config(y, {"chunk_slides": 2, "model": None})
    assert (cfg.input, cfg.caption_batch_size, cfg.chunk_slides, cfg.model) == (
        "s3://archive/slides/",
        8,
        2,
        None,
    )


def test_yaml_unknown_key_and_bad_yaml(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text("input: a\noutput: b\nbatchsize: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'batchsize'"):
        load_config(y)
    y.write_text("input: [a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(y)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


# -- identity -------------------------------------------------------------------------------
def test_identity_is_deterministic_and_sensitive():
    a = slide_id("s3://b/x.svs", "e1", 10)
    assert a == slide_id("s3://b/x.svs", "e1", 10) and len(a) == 32
    assert a != slide_id("s3://b/x.svs", "e2", 10)
    assert a != slide_id("s3://b/x.svs", "e1", 11)
    assert a != slide_id("s3://b/y.svs", "e1", 10)
    assert cell_id(a, 100.4, 200.6) == cell_id(a, 100.0, 201.0)
    assert cell_id(a, 100.0, 200.0) != cell_id(a, 101.0, 200.0)
    assert (
        chunk_name(["b", "a"], "v1") == chunk_name(["a", "b"], "v1") != chunk_name(["a", "b"], "v2")
    )


# -- listing --------------------------------------------------------------------------------
def _touch(root: Path, rel: str, data: bytes = b"x") -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def test_listing_groups_multi_file_slides(tmp_path):
    for rel in [
        "a.svs",
        "B.TIFF",
        "readme.txt",
        "truth.json",
        ".partial.svs",
        "m/slide1.mrxs",
        "m/slide1/Slidedat.ini",
        "m/slide1/Data0000.dat",
        "dicom/s1/f0.dcm",
        "dicom/s1/f1.dcm",
        "dicom/s2/only.dcm",
    ]:
        _touch(tmp_path, rel)
    lst = list_slides(
        storage_for(str(tmp_path)), str(tmp_path), JobConfig(input="i", output="o").extensions
    )
    by_name = {Path(s.uri).name or s.uri: s for s in lst.slides}
    assert len(lst.slides) == 5, [s.uri for s in lst.slides]
    mrxs = next(s for s in lst.slides if s.uri.endswith("slide1.mrxs"))
    assert sorted(p.rel for p in mrxs.parts) == [
        "slide1.mrxs",
        "slide1/Data0000.dat",
        "slide1/Slidedat.ini",
    ]
    assert mrxs.open_rel == "slide1.mrxs" and mrxs.size == 3
    s1 = next(s for s in lst.slides if s.uri.replace("\\", "/").endswith("dicom/s1/"))
    assert [p.rel for p in s1.parts] == ["f0.dcm", "f1.dcm"] and s1.open_rel == "f0.dcm"
    assert "B.TIFF" in by_name
    assert sorted(Path(u).name for u in lst.ignored) == [".partial.svs", "readme.txt", "truth.json"]


def test_listing_identity_changes_with_content(tmp_path):
    _touch(tmp_path, "a.svs", b"one")
    first = list_slides(storage_for(str(tmp_path)), str(tmp_path), (".svs",)).slides[0]
    os.utime(tmp_path / "a.svs", ns=(1, 1))
    second = list_slides(storage_for(str(tmp_path)), str(tmp_path), (".svs",)).slides[0]
    assert first.slide_id != second.slide_id
    assert ref_from_json(ref_to_json(second)) == second


def test_listing_missing_directory(tmp_path):
    with pytest.raises(StorageError, match="no such directory"):
        list_slides(storage_for(str(tmp_path / "nope")), str(tmp_path / "nope"), (".svs",))


# -- scratch confinement ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "key", ["../../etc/passwd", "a/../../b.svs", "/abs/x.svs", "..", "./a/./b.svs", "a\\..\\..\\c"]
)
def test_confined_path_never_escapes(tmp_path, key):
    root = tmp_path / "scratch"
    root.mkdir()
    try:
        p = confined_path(root, key)
    except StorageError as exc:
        assert repr(key) in str(exc)
        return
    assert root.resolve() in p.parents


def test_confined_path_keeps_layout(tmp_path):
    assert (
        confined_path(tmp_path, "slide1/Data0000.dat")
        == (tmp_path / "slide1" / "Data0000.dat").resolve()
    )


# -- writer ---------------------------------------------------------------------------------
_rows, _visible_cells = chunk_rows, visible_cell_ids


def test_writer_commit_and_done(tmp_path):
    out = tmp_path / "out"
    w = OutputWriter(storage_for(str(out)), str(out), "r1", "2026-01-02", "v1")
    c = w.commit_chunk(*_rows(["s1", "s2"]))
    assert c.cells == 4 and len(c.files) == 2
    assert (out / "cells" / "run_date=2026-01-02" / f"part-{c.name}.parquet").is_file()
    assert not any((out / "_journal").glob("*")) and not any((out / "_staging").rglob("*.parquet"))
    assert w.done_slides("v1") == {"s1", "s2"} and w.done_slides("v2") == set()
    assert _visible_cells(out) == ["s1-0", "s1-1", "s2-0", "s2-1"]


def test_failed_slides_are_not_done(tmp_path):
    out = tmp_path / "out"
    w = OutputWriter(storage_for(str(out)), str(out), "r1", "2026-01-02", "v1")
    cells, slides = _rows(["s1"], cells_per=0)
    slides[0]["status"] = "failed"
    w.commit_chunk(cells, slides)
    assert w.done_slides("v1") == set()
    assert not (out / "cells").exists()


@pytest.mark.parametrize("point", ["after_journal", "mid_publish"])
def test_crash_while_publishing_rolls_forward(tmp_path, point):
    out = tmp_path / "out"
    w = OutputWriter(storage_for(str(out)), str(out), "r1", "2026-01-02", "v1")
    with injected_fault(1, point):
        w.commit_chunk(*_rows(["s1"]))
        with pytest.raises(InjectedFault):
            w.commit_chunk(*_rows(["s2", "s3"]))
    assert list((out / "_journal").glob("*.json"))
    # Before recovery, s2/s3 are not done (their slides file is not visible yet).
    w2 = OutputWriter(storage_for(str(out)), str(out), "r2", "2026-01-03", "v1")
    assert w2.done_slides("v1") == {"s1"}
    rec = w2.recover()
    assert len(rec.rolled_forward) == 1 and rec.orphans_deleted == 0
    assert w2.done_slides("v1") == {"s1", "s2", "s3"}
    assert _visible_cells(out) == ["s1-0", "s1-1", "s2-0", "s2-1", "s3-0", "s3-1"]
    assert w2.recover().rolled_forward == []  # idempotent


def test_staging_without_journal_is_rolled_back(tmp_path):
    out = tmp_path / "out"
    st = storage_for(str(out))
    # A crash between staging and the journal leaves only invisible staged files.
    st.write_bytes(str(out / "_staging" / "r0" / "abc" / "cells.parquet"), b"partial")
    w = OutputWriter(st, str(out), "r1", "2026-01-02", "v1")
    assert visible_parquet(st, str(out), "cells") == []
    rec = w.recover()
    assert rec.orphans_deleted == 1 and rec.rolled_forward == []
    assert not list((out / "_staging").rglob("*.parquet"))


def test_stray_journal_file_is_deleted_not_a_block(tmp_path):
    out = tmp_path / "out"
    st = storage_for(str(out))
    st.write_bytes(str(out / "_journal" / "x.json"), b"{not json")
    rec = OutputWriter(st, str(out), "r1", "2026-01-02", "v1").recover()
    assert rec.notes == [f"deleted {out / '_journal' / 'x.json'}: not a commit journal"]
    assert not (out / "_journal" / "x.json").exists()


def test_same_chunk_maps_to_same_files(tmp_path):
    out = tmp_path / "out"
    w = OutputWriter(storage_for(str(out)), str(out), "r1", "2026-01-02", "v1")
    a = w.commit_chunk(*_rows(["s2", "s1"]))
    b = w.commit_chunk(*_rows(["s1", "s2"]))
    assert a.files == b.files
    assert _visible_cells(out) == ["s1-0", "s1-1", "s2-0", "s2-1"]
    assert json.loads(json.dumps(a.slide_ids)) == ["s2", "s1"]


def test_permanent_failures_are_settled_transient_ones_retried(tmp_path):
    out = tmp_path / "out"
    w = OutputWriter(storage_for(str(out)), str(out), "r1", "2026-01-02", "v1")
    cells, slides = _rows(["bad", "flaky"], cells_per=0)
    slides[0].update(status="failed", reason="SlideOpenError: s3://b/bad.svs: not a slide")
    slides[1].update(
        status="failed", reason="StorageError: s3://b/flaky.svs: download failed (503)"
    )
    w.commit_chunk(cells, slides)
    assert w.done_slides("v1") == {"bad"}
    assert w.done_slides("v1", retry_failed=True) == set()


def test_readme_column_tables_match_schema():
    from pipeline.job._docs import render

    doc = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert render() in doc, "regenerate the tables with: python -m pipeline.job._docs"


def test_skipped_rows_never_replace_chunks_nor_make_slides_done(tmp_path):
    out = tmp_path / "out"
    w = OutputWriter(storage_for(str(out)), str(out), "r1", "2026-01-02", "v1")
    cells, slides = _rows(["s1"], cells_per=0)
    slides[0]["status"] = "failed"
    slides[0]["reason"] = "StorageError: s3://b/s1.svs: download failed (503)"
    c = w.commit_chunk(cells, slides)
    w.write_skipped(
        [{"slide_id": "s1", "status": "skipped", "model_version": "v1", "run_id": "r1"}]
    )
    assert len(visible_parquet(storage_for(str(out)), str(out), "slides")) == 2
    assert (out / "slides" / "run_date=2026-01-02" / f"part-{c.name}.parquet").is_file()
    assert w.done_slides("v1") == set()


# -- output pre-flight -------------------------------------------------------------------------
def test_probe_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    OutputWriter(storage_for(str(out)), str(out), "r1", "2026-01-02", "v1").probe()
    assert out.is_dir() and list(out.rglob("*")) == []


def test_probe_names_the_output_when_it_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "out"
    with pytest.raises(StorageError, match="is not writable") as err:
        OutputWriter(storage_for(str(out)), str(out), "r1", "2026-01-02", "v1").probe()
    assert str(err.value).startswith(f"{out}: ") and "\n" not in str(err.value)


# -- environment -------------------------------------------------------------------------------
def _tiny_checkpoint(root: Path) -> str:
    from hemblip.model import build_model, save_model

    m = build_model("tiny")
    save_model(m.model, m.image_processor, m.tokenizer, root / "tiny")
    return str(root / "tiny")


def test_model_identity_leaves_the_process_environment_as_it_was(tmp_path, monkeypatch):
    from pipeline.job.run import model_identity

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    # The run's storage settings are passed, never put in the environment (nothing listens on 9).
    from pipeline.job.storage import S3Settings

    s3 = S3Settings(endpoint="http://127.0.0.1:9", region="us-east-1")
    keys = ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    before = {key: os.environ.get(key) for key in keys}
    model_id, version = model_identity(_tiny_checkpoint(tmp_path), s3)
    assert len(version) == 16 and model_id
    assert {key: os.environ.get(key) for key in keys} == before
    with pytest.raises(ConfigError, match="--model"):
        model_identity(str(tmp_path / "no-such-checkpoint"), s3)
    assert {key: os.environ.get(key) for key in keys} == before


@pytest.mark.parametrize(
    "name", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MY_API_TOKEN"]
)
def test_forwarding_a_secret_is_refused(name):
    from pipeline.errors import ConfigError
    from pipeline.job.config import JobConfig

    with pytest.raises(ConfigError, match=f"--forward-env .*{name} looks like a secret"):
        JobConfig(input="s3://a/in/", output="s3://a/out/", forward_env=(name,))
    JobConfig(input="s3://a/in/", output="s3://a/out/", forward_env=("AWS_ENDPOINT_URL",))


def test_s3_client_is_built_once_per_process_and_configuration(monkeypatch):
    # A client costs 0.1-0.3 CPU-s to build: every slide's storage must reuse it, but another
    # configuration or another credential environment must not get a stale one.
    from pipeline.job.storage import S3Settings, storage_for

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unit-key-a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unit-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s = S3Settings(endpoint="http://127.0.0.1:9")
    a = storage_for("s3://bucket-a/x.svs", s).client
    assert storage_for("s3://bucket-b/y.svs", S3Settings(endpoint="http://127.0.0.1:9")).client is a
    assert (
        storage_for(
            "s3://bucket-a/x.svs", S3Settings(endpoint="http://127.0.0.1:9", max_attempts=2)
        ).client
        is not a
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unit-key-b")
    assert storage_for("s3://bucket-a/x.svs", s).client is not a
