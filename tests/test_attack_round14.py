"""Attack round on e954da3..HEAD (issue 14): ``--candidate-mpp``, ``pipeline detect --zones``,
slides/ schema version 3, ``check_planned_area`` and ``detect_slide(max_task_px=...)``.

Tests of attacks the code already handles are kept as regression guards; the others show a
problem (see the report of this round). Unit tier: real files (a whole smear built from the
shared TXL-PBC data where one is needed, hand-written tiled TIFFs read by OpenSlide), no Ray.
"""

from __future__ import annotations

import argparse
import decimal
import struct
import zlib
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.errors import ConfigError, SlideTooLargeError
from pipeline.job.config import JobConfig, load_config, settings
from pipeline.whole_smear import DEFAULT_DATA_DIR, SmearSpec, build_whole_smear

pytestmark = pytest.mark.unit

_DATA = pytest.mark.skipif(
    not (DEFAULT_DATA_DIR / "txl_pbc").is_dir(), reason="shared data not present"
)
_BASE = {"input": "/tmp/in", "output": "/tmp/out"}
_FLAG = "--candidate-mpp (config key candidate_mpp)"
# A 1.0 x 0.5 mm smear without a feathered edge (4000 x 2000 px at 0.25 µm/px, levels 0.25 and
# 1.0 µm/px): --zones feathered plans no region at all while its candidate level (1.0) exists.
_NO_FEATHER = dict(
    width_mm=1.0,
    height_mm=0.5,
    seed=3,
    source="pbc",
    monolayer_fraction=0.35,
    feathered_fraction=0.0,
    wbc_per_mm2=60.0,
)


@pytest.fixture(scope="module")
def no_feather(tmp_path_factory):
    if not (DEFAULT_DATA_DIR / "txl_pbc").is_dir():
        pytest.skip("shared data not present")
    return build_whole_smear(tmp_path_factory.mktemp("atk14"), SmearSpec(**_NO_FEATHER), name="nf")


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A 16 x 16 px glass-coloured PNG: read whole in milliseconds (with --mpp)."""
    p = tmp_path / "tiny.png"
    Image.fromarray(np.full((16, 16, 3), 235, np.uint8)).save(p)
    return p


def _tiled_tiff(path: Path, side: int, rgb=(235, 228, 232), tile: int = 256) -> Path:
    """A single-level (non-pyramidal) tiled RGB TIFF of ``side`` x ``side`` px whose tiles all
    point at one deflate-compressed tile: a gigapixel file of a few MB, read by OpenSlide
    (generic-tiff) like any other. Written by hand: tifffile compresses every tile itself."""
    data = zlib.compress(np.full((tile, tile, 3), rgb, np.uint8).tobytes(), 9)
    n = (-(-side // tile)) ** 2
    off_data = 8
    off_bps = off_data + len(data)
    pad = (off_bps + 6) % 2
    off_offs = off_bps + 6 + pad
    off_cnts = off_offs + 4 * n
    off_ifd = off_cnts + 4 * n

    def long(tag: int, count: int, value: int) -> bytes:
        return struct.pack("<HHII", tag, 4, count, value)

    def short(tag: int, value: int) -> bytes:
        return struct.pack("<HHIHH", tag, 3, 1, value, 0)

    entries = [
        long(256, 1, side),
        long(257, 1, side),
        struct.pack("<HHII", 258, 3, 3, off_bps),
        short(259, 8),  # deflate
        short(262, 2),  # RGB
        short(277, 3),
        short(284, 1),
        short(322, tile),
        short(323, tile),
        long(324, n, off_offs),
        long(325, n, off_cnts),
    ]
    with open(path, "wb") as f:
        f.write(b"II" + struct.pack("<HI", 42, off_ifd))
        f.write(data)
        f.write(struct.pack("<HHH", 8, 8, 8) + b"\0" * pad)
        f.write(struct.pack(f"<{n}I", *([off_data] * n)))
        f.write(struct.pack(f"<{n}I", *([len(data)] * n)))
        f.write(struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0))
    return path


def _detect_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from pipeline.__main__ import main

    try:
        rc = main(["detect", *argv])
    except SystemExit as exit_:  # argparse's own refusal
        rc = exit_.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _load(argv: list[str], config: Path | None = None) -> JobConfig:
    from pipeline.cli.run import add_arguments, overrides_from

    p = argparse.ArgumentParser()
    add_arguments(p)
    return load_config(config, overrides_from(p.parse_args(["--input=/a", "--output=/b", *argv])))


# -- candidate_mpp: keyword, YAML, command line (handled: regression guards) ---------------------
@pytest.mark.parametrize(
    "bad",
    [
        False,
        "NaN",
        "inf",
        "-inf",
        "1e400",
        pytest.param(10**400, id="10**400"),
        pytest.param(-(10**400), id="-10**400"),
        pytest.param(2**63, id="2**63"),
        "null",
        "",
        " ",
        "none none",
        "none\x00",
        b"none",
        (1.1,),
        {"none": None},
        {"a": {"b": 1}},
        decimal.Decimal("1.1"),
        complex(1, 0),
        "0x1",
        "1_1",
        "\uff11.\uff11",  # fullwidth 1.1
    ],
)
def test_candidate_mpp_keyword_refuses_in_one_short_line(bad):
    with pytest.raises(ConfigError) as err:
        JobConfig(**_BASE, candidate_mpp=bad)
    msg = str(err.value)
    assert msg.startswith(_FLAG) and "\n" not in msg and len(msg) < 200, msg


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("~", None),
        ("null", None),
        ("None", None),
        ("NONE", None),
        ("' none '", None),
        ('"None"', None),
        ("1", 1.0),
        ("'1.5'", 1.5),
        ("5.0", 5.0),
    ],
)
def test_candidate_mpp_yaml_values_taken(tmp_path, text, want):
    y = tmp_path / "job.yaml"
    y.write_text(f"candidate_mpp: {text}\n", encoding="utf-8")
    assert _load([], y).candidate_mpp == want


@pytest.mark.parametrize(
    "text",
    [
        ".nan",
        ".inf",
        "-.inf",
        "1e400",  # a string to PyYAML (no dot)
        "1.0e+400",  # a float: inf
        pytest.param("1" + "0" * 400, id="1e400-as-int"),
        "yes",
        "true",
        "[none]",
        "{a: 1}",
        "2026-01-01",
        "'nan'",
        "0.4999",
        "5.0001",
    ],
)
def test_candidate_mpp_bad_yaml_values_are_one_line_naming_the_flag(tmp_path, text):
    y = tmp_path / "job.yaml"
    y.write_text(f"candidate-mpp: {text}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        _load([], y)
    msg = str(err.value)
    assert msg.startswith(_FLAG) and "\n" not in msg and len(msg) < 200, msg


def test_candidate_mpp_run_flag_edge_texts(capsys):
    assert _load(["--candidate-mpp", " none "]).candidate_mpp is None
    assert _load(["--candidate-mpp", "None"]).candidate_mpp is None
    for text in ("NaN", "inf", "", "1_1", "\uff11.\uff11", "none,none"):
        with pytest.raises(SystemExit):
            _load(["--candidate-mpp", text])
        assert "argument --candidate-mpp: invalid number" in capsys.readouterr().err, text
    with pytest.raises(ConfigError) as err:
        _load(["--candidate-mpp", "1e400"])
    assert str(err.value).startswith(f"{_FLAG} must be a finite number"), err.value


def test_the_word_none_leaks_into_no_other_number_setting():
    """Only candidate_mpp takes the word none; every other number setting refuses it, and the
    word never reaches a stage's settings as text."""
    for s in settings():
        if s.kind not in ("int", "float") or s.name == "candidate_mpp":
            continue
        assert not s.none_word, s.name
        with pytest.raises(ConfigError) as err:
            JobConfig(**_BASE, **{s.name: "none"})
        assert str(err.value).startswith(f"--{s.name.replace('_', '-')} "), (s.name, err.value)
    cfg = JobConfig(**_BASE, candidate_mpp=" None ")
    assert cfg.detect_settings().candidate_mpp is None
    assert cfg.to_json_dict()["candidate_mpp"] is None
    assert JobConfig(**cfg.to_json_dict()).candidate_mpp is None  # runs/config_json reloads


# -- pipeline detect --candidate-mpp / --zones ----------------------------------------------------
@pytest.mark.parametrize("text", ["1_1", "\uff11.\uff11"])
def test_detect_candidate_mpp_refuses_what_the_run_flag_refuses(text, tiny, tmp_path, capsys):
    """PROBLEM: pipeline/cli/detect.py _mpp_or_none parses with float(), which takes '1_1'
    (11.0: the error then says 'got 11.0', not what was typed) and other scripts' digits
    ('１.１' runs as 1.1); ``run``'s _number refuses both (its comment says why)."""
    out = tmp_path / "o.parquet"
    rc, _, err = _detect_cli(
        [str(tiny), "--mpp", "0.25", "--out", str(out), "--candidate-mpp", text], capsys
    )
    assert rc == 2 and "--candidate-mpp" in err and repr(text) in err, (rc, err)


def test_detect_zones_error_is_short_for_a_huge_argument(tiny, tmp_path, capsys):
    """PROBLEM: pipeline/cli/detect.py _zones echoes the whole --zones argument: a 3000-char
    value gives a 3000-char error line (the other messages cut values at 40-120 chars)."""
    rc, _, err = _detect_cli(
        [str(tiny), "--out", str(tmp_path / "o.parquet"), "--zones", "x" * 3000], capsys
    )
    assert rc == 2 and "--zones" in err
    assert all(len(line) < 300 for line in err.splitlines()), max(map(len, err.splitlines()))


@pytest.mark.parametrize(
    "value", ["auto", "none", "", ",", " , ", "mono\x1b[31mlayer", "monolayer\nthick"]
)
def test_detect_bad_zone_names_are_one_line(value, tiny, tmp_path, capsys):
    rc, _, err = _detect_cli(
        [str(tiny), "--out", str(tmp_path / "o.parquet"), "--zones", value], capsys
    )
    assert rc == 2 and err.startswith("error: --zones ") and err.count("\n") == 1, err
    assert "\x1b" not in err and "give one or more of glass, thick, monolayer, feathered" in err
    assert not (tmp_path / "o.parquet").exists()


def test_detect_zones_on_unusable_files_is_one_line_naming_the_file(tiny, tmp_path, capsys):
    """A tiny plain image, one without a scale, and a non-pyramidal all-glass TIFF: each gets one
    ``error: <path>: <cause>`` line, no traceback, exit 1."""
    flat = _tiled_tiff(tmp_path / "flat.tif", 1024)
    out = str(tmp_path / "o.parquet")
    for argv, path in (
        ([str(tiny), "--mpp", "0.25"], tiny),  # nothing stained
        ([str(tiny)], tiny),  # no scale
        ([str(flat), "--mpp", "0.25"], flat),  # non-pyramidal, glass only
    ):
        rc, _, err = _detect_cli([*argv, "--out", out, "--zones", "monolayer"], capsys)
        lines = err.splitlines()
        assert rc == 1 and len(lines) == 1 and lines[0].startswith(f"error: {path}: "), err
        assert "Traceback" not in err


@_DATA
def test_detect_summary_of_a_zoned_file_with_no_region_says_no_none(no_feather, tmp_path, capsys):
    """PROBLEM: pipeline/cli/detect.py _summary prints info['candidates'] and
    info['verify_windows'] as given; a coarse-to-fine plan with no region (the chosen zone is
    absent) leaves them None: 'candidates on level 1 (None found, None level-0 windows
    verified)'."""
    rc, out, err = _detect_cli(
        [str(no_feather.path), "--out", str(tmp_path / "o.parquet"), "--zones", "feathered"],
        capsys,
    )
    line = out.splitlines()[0]
    assert rc == 0 and "0 region tasks" in line, (out, err)
    assert "None" not in line, line


@_DATA
def test_a_job_slide_with_no_region_read_records_no_candidate_level(no_feather):
    """PROBLEM (minor): pipeline/job/stage_detect.py _find_cells stores candidate_mpp from the
    plan's candidate level even when the plan has no region: slides/ then says candidates were
    sought at 1.0 µm/px on a slide where nothing was read (region_tasks 0), and the run summary
    adds 'candidates at 1.00 µm/px'."""
    from pipeline.job.listing import SlidePart, SlideRef
    from pipeline.job.stage_detect import process_slide, records

    p = no_feather.path
    size = p.stat().st_size
    ref = SlideRef("ab" * 16, str(p), "e", size, (SlidePart(str(p), p.name, size, "e"),), p.name)
    settings = JobConfig(**_BASE, zones=("feathered",), thumbnails=False).detect_settings()
    out = [r for b in process_slide(ref, settings) for r in records(b)][-1]
    assert out["status"] == "ok" and out["zoning"] == "zoned" and out["region_tasks"] == 0, out
    assert out["candidate_mpp"] is None, out["candidate_mpp"]


@pytest.mark.parametrize("bad", ["none", 0.1, float("nan"), True])
def test_detect_settings_guard_candidate_mpp_on_direct_construction(bad):
    """PROBLEM (minor): DetectSettings.__post_init__ guards its other new fields on direct
    construction but not candidate_mpp: a bad value is only seen per slide, each slide failing
    with the same DetectConfig message."""
    from pipeline.job.stage_detect import DetectSettings
    from pipeline.job.storage import S3Settings

    with pytest.raises(ConfigError, match="candidate"):
        DetectSettings(s3=S3Settings(), candidate_mpp=bad)


# -- detect_slide(max_task_px=) -------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "abc"])
def test_detect_slide_refuses_a_bad_max_task_px_even_when_read_whole(bad, tiny):
    """PROBLEM: pipeline/detect.py detect_slide checks max_cells and seed up front
    (_check_budget) but not max_task_px: read whole it is ignored (0, -1, True, 'abc' run)."""
    from pipeline.detect import DetectConfig, detect_slide

    with pytest.raises(ConfigError, match="max_task_px"):
        detect_slide(tiny, DetectConfig(mpp=0.25), max_task_px=bad)


def test_detect_slide_bad_max_task_px_is_a_config_error_before_the_file(tmp_path):
    """PROBLEM: zoned, a bad max_task_px is only seen by split_regions, after the file was opened
    and zoned: a missing file reports SlideOpenError, a whole smear is zoned first."""
    from pipeline.detect import detect_slide

    with pytest.raises(ConfigError, match="max_task_px"):
        detect_slide(tmp_path / "missing.svs", zones=True, max_task_px=0)


@_DATA
@pytest.mark.parametrize("bad", [0, False, "64"])
def test_detect_slide_zoned_refuses_a_bad_max_task_px(bad, no_feather):
    from pipeline.detect import detect_slide

    with pytest.raises(ConfigError, match=r"^max_task_px must be a positive integer"):
        detect_slide(no_feather.path, zones=True, max_task_px=bad)


# -- check_planned_area and the size guard of zoned reads ----------------------------------------
@_DATA
def test_check_planned_area_names_the_given_name_and_counts_only_the_plan(no_feather):
    from pipeline.detect import DetectConfig, check_planned_area, plan_smear
    from pipeline.slides import open_slide

    cfg = DetectConfig()
    with open_slide(no_feather.path) as slide:
        plan = plan_smear(slide, cfg, select=("monolayer",))
        empty = plan_smear(slide, cfg, zone_map=plan.zone_map, select=("feathered",))
        assert plan.tasks and not empty.tasks
        check_planned_area(slide, plan, cfg, "s3://b/x.svs")  # far under 2**32
        check_planned_area(slide, empty, replace(cfg, max_detect_pixels=1), "s3://b/x.svs")
        with pytest.raises(SlideTooLargeError) as err:
            check_planned_area(slide, plan, replace(cfg, max_detect_pixels=1000), "s3://b/x.svs")
    msg = str(err.value)
    assert msg.startswith("s3://b/x.svs: the chosen zones cover ") and "\n" not in msg, msg
    assert "over the 1000 px limit" in msg


def test_a_zoned_read_refuses_a_level_too_large_to_zone_before_zoning_it(tmp_path):
    """PROBLEM: pipeline/detect.py detect_slide skips the detection-level guard when zoned and
    checks only the planned area, after plan_smear has zoned the slide. A non-pyramidal slide
    has no coarse level to zone from, so zoning reads all of level 0 first: a 10 GP single-level
    tiled TIFF (1.2 MB, `pipeline detect --mpp 0.25`) is refused in 1.3 s read whole but was
    still being zoned after 120 s with --zones monolayer. Here: a 4 MP non-pyramidal glass TIFF
    under a 1 MP guard is zoned (ZoneError 'nothing stained') instead of refused."""
    from pipeline.detect import DetectConfig, detect_slide

    flat = _tiled_tiff(tmp_path / "flat.tif", 2048)
    cfg = DetectConfig(mpp=0.25, max_detect_pixels=2**20)
    with pytest.raises(SlideTooLargeError) as err:
        detect_slide(flat, cfg, zones=True)
    assert str(err.value).startswith(f"{flat}: "), err.value


# -- slides/ schema version 3 over older outputs ---------------------------------------------------
def test_a_version_1_slides_file_reads_the_new_columns_as_null(tmp_path):
    """A slides/ file written under version 1 (neither the zone columns of version 2 nor the
    read-mode columns of version 3) still opens; every later column reads null."""
    from pipeline.query import connect
    from pipeline.schema import SLIDE_SCHEMA

    names = SLIDE_SCHEMA.names
    later = set(names[names.index("zones_selected") : names.index("candidate_mpp") + 1])
    assert {"zoning", "region_tasks", "region_tasks_fanned_out", "candidate_mpp"} <= later
    v1 = pa.schema([f for f in SLIDE_SCHEMA if f.name not in later])
    d = tmp_path / "slides" / "run_date=2025-06-01"
    d.mkdir(parents=True)
    row = {
        "slide_id": "v1",
        "slide_uri": "s3://b/<script>alert(1)</script>.svs",
        "status": "ok",
        "cell_count": 2,
        "run_id": "r1",
        "model_version": "m",
        "finished_at": datetime(2025, 6, 1, tzinfo=UTC),
    }
    pq.write_table(pa.Table.from_pylist([row], schema=v1), d / "part-v1.parquet")
    con = connect(str(tmp_path))
    got = con.execute(
        "SELECT slide_id, zoning, region_tasks, region_tasks_fanned_out, candidate_mpp, "
        "zones_selected FROM current_slides"
    ).fetchall()
    assert got == [("v1", None, None, None, None, None)]
    assert con.execute(
        "SELECT count(*) FROM slides WHERE zoning IS NULL AND candidate_mpp IS NULL"
    ).fetchone() == (1,)


def test_the_run_summary_of_a_zoned_slide_with_no_region_or_no_candidates():
    """The summary's words for the new columns: no region task is not '0 region tasks', one
    stage (candidate_mpp null) says nothing about candidates."""
    from pipeline.job.run import _zone_note

    base = {"zones_selected": ["feathered"], "zoning": "zoned", "cell_count": 0}
    assert _zone_note({**base, "region_tasks": 0, "region_tasks_fanned_out": False}) == (
        " [zones feathered]"
    )
    assert _zone_note({"zoning": None, "cell_count": 1, "candidate_mpp": None}) == ""
