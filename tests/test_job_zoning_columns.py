"""Issue 14 in the job: ``--candidate-mpp`` is a job setting and a ``detect`` flag that reaches
every ``DetectConfig`` the detect stage builds (zoned slides in one process, under a cell budget,
and in region tasks fanned out as Ray tasks), and ``slides/`` stores how each slide was read
(schema version 3: ``zoning``, ``region_tasks``, ``region_tasks_fanned_out``, ``candidate_mpp``);
rows written before version 3 read those columns as null."""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ConfigError
from pipeline.job.config import JobConfig, load_config
from pipeline.job.listing import SlidePart, SlideRef
from pipeline.job.stage_detect import DetectSettings, process_slide, records
from pipeline.schema import SCHEMA_VERSION, SLIDE_SCHEMA
from pipeline.whole_smear import DEFAULT_DATA_DIR, SmearSpec, build_whole_smear

_DATA = pytest.mark.skipif(
    not (DEFAULT_DATA_DIR / "txl_pbc").is_dir(), reason="shared data not present"
)
REPO = Path(__file__).resolve().parents[1]
_BASE = {"input": "/tmp/in", "output": "/tmp/out"}
_SID = "ef" * 16
# A 1.6 x 0.8 mm smear (6400 x 3200 px at 0.25 µm/px, levels 1.0 and 4.0 µm/px): ~28 monolayer
# white cells; coarse-to-fine finds its candidates on level 1 (1.0 µm/px). Seconds to build and
# to detect; its cells' measurements differ between the two modes (crops read without the
# centring margin coarse-to-fine), so a mode that did not reach detection shows.
_SPEC = dict(
    width_mm=1.6,
    height_mm=0.8,
    seed=21,
    source="pbc",
    monolayer_fraction=0.35,
    wbc_per_mm2=60.0,
)
_NEW = ("zoning", "region_tasks", "region_tasks_fanned_out", "candidate_mpp")
_FIELD = REPO / "pipeline" / "sample_data" / "bccd" / "JPEGImages" / "BloodImage_00000.jpg"


@pytest.fixture(scope="module")
def smear(tmp_path_factory):
    return build_whole_smear(tmp_path_factory.mktemp("jzc"), SmearSpec(**_SPEC), name="jzc")


def _ref(path: Path, sid: str = _SID) -> SlideRef:
    size = path.stat().st_size
    return SlideRef(
        sid, str(path), "e", size, (SlidePart(str(path), path.name, size, "e"),), path.name
    )


def _seed(sid: str) -> int:
    return int(sid[:15], 16)  # stage_detect's budget seed: from the slide identity


def _load(argv: list[str], config: Path | None = None) -> JobConfig:
    from pipeline.cli.run import add_arguments, overrides_from

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--input=/tmp/in", "--output=/tmp/out", *argv])
    return load_config(config, overrides_from(args))


def _run(settings: DetectSettings, ref: SlideRef) -> tuple[list[dict], np.ndarray, dict]:
    rows, crops = [], []
    for b in process_slide(ref, settings):
        rows += records(b)
        crops += [b["crop"][i] for i in range(len(b["kind"])) if b["kind"][i] == "cell"]
    return rows[:-1], np.array(crops), rows[-1]


def _same_cells(cells: list[dict], crops: np.ndarray, want) -> bool:
    """The stage's rows are exactly ``detect_slide``'s records (but ``source``) and crops."""
    if len(cells) != len(want.records):
        return False
    for c, rec in zip(cells, want.records, strict=True):
        if any(c[k] != v for k, v in rec.items() if k != "source"):
            return False
    return np.array_equal(crops.reshape(want.crops.shape), want.crops)


# -- the setting ----------------------------------------------------------------------------------
@pytest.mark.unit
def test_candidate_mpp_is_a_job_setting_with_none_for_one_stage(tmp_path):
    assert JobConfig(**_BASE).candidate_mpp == 1.1
    assert JobConfig(**_BASE).detect_settings().candidate_mpp == 1.1
    for none in (None, "none", "None", " NONE "):
        cfg = JobConfig(**_BASE, candidate_mpp=none)
        assert cfg.candidate_mpp is None and cfg.detect_settings().candidate_mpp is None, none
    assert JobConfig(**_BASE, candidate_mpp="2.5").detect_settings().candidate_mpp == 2.5
    # the command line: a number, or the word none; no flag keeps the default (or the file's)
    assert _load(["--candidate-mpp", "none"]).candidate_mpp is None
    assert _load(["--candidate-mpp", "4"]).candidate_mpp == 4.0
    assert _load([]).candidate_mpp == 1.1
    y = tmp_path / "job.yaml"
    for text, want in (("null", None), ("none", None), ("0.5", 0.5)):
        y.write_text(f"candidate_mpp: {text}\n")
        assert _load([], y).candidate_mpp == want, text
    y.write_text("candidate-mpp: none\n")
    assert _load(["--candidate-mpp", "2"], y).candidate_mpp == 2.0  # the flag wins
    # recorded in runs/config_json as null
    assert JobConfig(**_BASE, candidate_mpp="none").to_json_dict()["candidate_mpp"] is None


@pytest.mark.unit
@pytest.mark.parametrize(
    "bad", [0.3, 0.49, 5.01, -1, 0, "abc", "nan", True, [1.0], math.inf, "nones"]
)
def test_bad_candidate_mpp_is_a_one_line_error_naming_the_flag(bad):
    with pytest.raises(ConfigError) as err:
        JobConfig(**_BASE, candidate_mpp=bad)
    msg = str(err.value)
    assert msg.startswith("--candidate-mpp (config key candidate_mpp)") and "\n" not in msg, msg


@pytest.mark.unit
def test_bad_candidate_mpp_on_the_command_line_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        _load(["--candidate-mpp", "nan"])
    assert exit_.value.code == 2 and "--candidate-mpp" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"^--candidate-mpp .*must be none or a number"):
        _load(["--candidate-mpp", "0.25"])


@pytest.mark.unit
def test_the_word_none_is_only_taken_where_none_is_not_the_default(capsys):
    """``--mpp none`` or ``--caption-gpus-per-actor none`` would read as their defaults
    (no scale; GPUs if the cluster has them), not as what the word says: refused."""
    for name in ("mpp", "caption_gpus_per_actor", "max_detect_mpp"):
        with pytest.raises(ConfigError, match=f"^--{name.replace('_', '-')} .*must be a number"):
            JobConfig(**_BASE, **{name: "none"})
    with pytest.raises(SystemExit):
        _load(["--mpp", "none"])
    capsys.readouterr()


@pytest.mark.unit
def test_schema_file_takes_none_for_candidate_mpp():
    import jsonschema

    schema = json.loads((REPO / "cluster" / "job-config.schema.json").read_text())
    v = jsonschema.Draft202012Validator(schema)
    for good in (None, "none", "None", 0.5, 1.1, 5):
        assert v.is_valid({"candidate_mpp": good}), good
    for bad in ("nothing", "0.7", 0.4, 5.5, True):
        assert not v.is_valid({"candidate_mpp": bad}), bad
    docs = (REPO / "docs" / "settings.md").read_text()
    assert (
        "| `candidate_mpp` | `--candidate-mpp UM_PER_PX\\|none` | number, null or `none` |" in docs
    )


# -- the detect stage: candidate_mpp reaches detection; how the slide was read --------------------
@pytest.mark.unit
@_DATA
def test_candidate_mpp_reaches_detection_in_one_process_and_under_a_budget(smear):
    from pipeline.detect import DetectConfig, detect_slide

    ref = _ref(Path(smear.path))
    got = {}
    for setting, cfg, level_mpp in (
        (1.1, DetectConfig(), 1.0),
        ("none", DetectConfig(candidate_mpp=None), None),
    ):
        job = JobConfig(**_BASE, zones=("monolayer",), candidate_mpp=setting, thumbnails=False)
        settings = job.detect_settings()
        for budget in (None, 5):
            # no Ray here (region_tasks_in_flight 0), even when a test started it
            s = replace(settings, max_cells=budget, region_tasks_in_flight=0)
            cells, crops, out = _run(s, ref)
            assert out["status"] == "ok", out["reason"]
            want = detect_slide(smear.path, cfg, zones=True, max_cells=budget, seed=_seed(_SID))
            assert _same_cells(cells, crops, want), (setting, budget)
            assert (out["zoning"], out["zoning_rule"]) == ("zoned", "chosen")
            assert out["region_tasks"] == want.info["region_tasks"] >= 1
            assert out["region_tasks_fanned_out"] is False
            assert out["candidate_mpp"] == level_mpp, (setting, out["candidate_mpp"])
            assert want.info["candidate_level"] == (None if level_mpp is None else 1)
            got[setting, budget] = cells
    # the two modes measure differently: the setting is not inert
    for budget in (None, 5):
        assert got[1.1, budget] != got["none", budget]


@pytest.mark.unit
def test_a_slide_read_whole_records_whole_and_no_regions():
    for zones in (("none",), ("auto",)):  # a field image is under --zone-min-area-mm2
        settings = JobConfig(
            **_BASE, zones=zones, mpp=0.072, thumbnails=False, candidate_mpp=1.1
        ).detect_settings()
        cells, _, out = _run(settings, _ref(_FIELD))
        assert out["status"] == "ok" and len(cells) == out["cell_count"] >= 1, out
        assert out["zoning"] == "whole", zones
        assert out["zoning_rule"] == ("off" if zones == ("none",) else "auto_whole")
        assert [out[k] for k in _NEW[1:]] == [None, None, None]


@pytest.mark.unit
def test_a_slide_that_fails_to_open_has_no_zoning(tmp_path):
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a slide" * 100)
    _, _, out = _run(JobConfig(**_BASE).detect_settings(), _ref(bad))
    assert out["status"] == "failed" and [out[k] for k in _NEW] == [None] * 4


# -- slides/: the columns, written and read back; older rows read null ----------------------------
def _row(sid: str, **kw) -> dict:
    row = {
        "slide_id": sid,
        "slide_uri": f"s3://b/{sid}.svs",
        "slide_etag": "e",
        "status": "ok",
        "cell_count": 1,
        "run_id": "r3",
        "model_version": "v1",
        # outcome keys that are not columns are left out by the writer
        "zoning_rule": "auto_zoned",
        "area_mm2": 210.0,
        "region_workers": ["h:1", "h:2"],
        "region_peak_rss_mib": 652.0,
    }
    row.update(kw)
    return row


def _write_old_slides(root: Path, missing: tuple[str, ...], version: str, **row) -> None:
    """One ok slides row in a file of an older schema version: the slides schema without the
    ``missing`` columns (``row`` overrides the defaults)."""
    old = pa.schema([f for f in SLIDE_SCHEMA if f.name not in missing])
    d = root / "slides" / "run_date=2026-01-01"
    d.mkdir(parents=True)
    sid = row.get("slide_id", "old")
    base = {
        "slide_id": sid,
        "slide_uri": f"s3://b/{sid}.svs",
        "status": "ok",
        "cell_count": 1,
        "run_id": "r2",
        "model_version": "v1",
        "finished_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    pq.write_table(
        pa.Table.from_pylist([{**base, **row}], schema=old), d / f"part-{version}.parquet"
    )


@pytest.mark.unit
def test_slides_rows_store_how_each_slide_was_read_and_older_rows_read_null(tmp_path):
    from pipeline.job.storage import storage_for
    from pipeline.job.writer import OutputWriter
    from pipeline.query import connect

    assert SCHEMA_VERSION == "4"
    types = {name: str(SLIDE_SCHEMA.field(name).type) for name in _NEW}
    assert types == {
        "zoning": "string",
        "region_tasks": "int32",
        "region_tasks_fanned_out": "bool",
        "candidate_mpp": "double",
    }
    assert SLIDE_SCHEMA.field("candidate_mpp").metadata[b"unit"] == "µm/px".encode()
    # a version-2 file: the slides schema without the new columns
    _write_old_slides(tmp_path, _NEW, "v2", slide_id="old", zones_selected=["monolayer"])
    w = OutputWriter(storage_for(str(tmp_path)), str(tmp_path), "r3", "2026-01-02", "v1")
    w.commit_chunk(
        [],
        [
            _row(
                "fanned",
                zoning="zoned",
                region_tasks=27,
                region_tasks_fanned_out=True,
                candidate_mpp=1.0,
            ),
            _row(
                "serial",
                zoning="zoned",
                region_tasks=1,
                region_tasks_fanned_out=False,
                candidate_mpp=None,
            ),
            _row("whole", zoning="whole", zoning_rule="auto_whole"),
            _row("failed", status="failed", reason="SlideOpenError: x", failure_class="slide"),
        ],
    )
    con = connect(str(tmp_path))
    got = {
        r[0]: r[1:]
        for r in con.execute(
            "SELECT slide_id, zoning, region_tasks, region_tasks_fanned_out, candidate_mpp "
            "FROM slides"
        ).fetchall()
    }
    assert got == {
        "fanned": ("zoned", 27, True, 1.0),
        "serial": ("zoned", 1, False, None),
        "whole": ("whole", None, None, None),
        "failed": (None, None, None, None),
        "old": (None, None, None, None),
    }
    assert con.execute(
        "SELECT count(*) FROM slides WHERE zoning = 'zoned' AND region_tasks_fanned_out"
    ).fetchone() == (1,)


@pytest.mark.unit
def test_estimated_totals_are_stored_and_version_3_rows_read_null(tmp_path):
    from pipeline.job.run import _zone_note
    from pipeline.job.storage import storage_for
    from pipeline.job.writer import OutputWriter
    from pipeline.query import connect

    assert str(SLIDE_SCHEMA.field("cells_total_estimated").type) == "bool"
    _write_old_slides(
        tmp_path,
        ("cells_total_estimated",),
        "v3",
        slide_id="v3",
        cell_count=5,
        cells_total=40,
        sampled=True,
    )
    w = OutputWriter(storage_for(str(tmp_path)), str(tmp_path), "r3", "2026-01-02", "v1")
    w.commit_chunk(
        [],
        [
            _row("fields", cells_total=3502, sampled=True, cells_total_estimated=True),
            _row("counted", cells_total=1, sampled=False, cells_total_estimated=False),
        ],
    )
    got = dict(
        connect(str(tmp_path))
        .execute("SELECT slide_id, cells_total_estimated FROM slides")
        .fetchall()
    )
    assert got == {"fields": True, "counted": False, "v3": None}
    note = _zone_note({"sampled": True, "cell_count": 200, "cells_total": 3502})
    assert "200 of 3502 cells sampled" in note
    note = _zone_note(
        {"sampled": True, "cell_count": 200, "cells_total": 3502, "cells_total_estimated": True}
    )
    assert "200 of ~3502 cells sampled" in note


@pytest.mark.unit
def test_the_summary_says_how_a_zoned_slide_was_read():
    from pipeline.job.run import _zone_note

    base = {"zones_selected": ["monolayer"], "zoning": "zoned", "cell_count": 3}
    note = _zone_note(
        {**base, "region_tasks": 27, "region_tasks_fanned_out": True, "candidate_mpp": 1.0}
    )
    assert note == " [zones monolayer; 27 region tasks as Ray tasks; candidates at 1.00 µm/px]"
    note = _zone_note({**base, "region_tasks": 1, "region_tasks_fanned_out": False})
    assert note == " [zones monolayer; 1 region task in one process]"
    assert _zone_note({"zoning": "whole", "cell_count": 3}) == ""


# -- python -m pipeline detect --zones / --candidate-mpp -------------------------------------------
@pytest.mark.unit
@_DATA
def test_detect_command_zones_and_candidate_mpp(smear, tmp_path, capsys):
    from pipeline.__main__ import main
    from pipeline.detect import DetectConfig, detect_slide

    out = tmp_path / "c.parquet"
    rows = {}
    for extra, cfg, words in (
        ([], DetectConfig(), "candidates on level 1 ("),
        (["--candidate-mpp", "none"], DetectConfig(candidate_mpp=None), "one stage"),
    ):
        argv = ["detect", str(smear.path), "--out", str(out), "--zones", "Monolayer", *extra]
        assert main(argv) == 0
        line = capsys.readouterr().out.splitlines()[0]
        assert "; zones monolayer: " in line and words in line, line
        table = pq.read_table(out)
        assert table.schema.names[-2:] == ["smear_zone", "rbc_density"]
        got = table.to_pylist()
        want = detect_slide(smear.path, cfg, zones=True)
        assert [(r["centroid_x"], r["cell_area_um2"]) for r in got] == [
            (r["centroid_x"], r["cell_area_um2"]) for r in want.records
        ]
        assert {r["smear_zone"] for r in got} == {"monolayer"}
        rows[words] = got
    assert rows["one stage"] != rows["candidates on level 1 ("]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--candidate-mpp", "0.3"], "(--candidate-mpp): must be None or a number of µm/px in"),
        (["--candidate-mpp", "abc"], "argument --candidate-mpp: not a number of µm/px or none"),
        (["--zones", "monolayer,edge"], "--zones 'monolayer,edge': give one or more of glass,"),
    ],
)
def test_detect_command_refuses_bad_zone_flags(argv, says, tmp_path, capsys):
    from pipeline.__main__ import main

    try:
        rc = main(["detect", str(_FIELD), "--out", str(tmp_path / "o.parquet"), *argv])
    except SystemExit as exit_:  # argparse's own refusal (not a number)
        rc = exit_.code
    assert rc == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


# -- region tasks fanned out as Ray tasks get the setting too -------------------------------------
@pytest.mark.integration
@_DATA
def test_region_tasks_fanned_out_use_the_slides_candidate_mpp(ray_cluster, smear):
    from pipeline.detect import DetectConfig, detect_slide

    ref = _ref(Path(smear.path))

    def run(ref, settings):  # by value to the worker: no name of this test module in it
        rows, crops = [], []
        for b in process_slide(ref, settings):
            rows += records(b)
            crops += [b["crop"][i] for i in range(len(b["kind"])) if b["kind"][i] == "cell"]
        return rows[:-1], crops, rows[-1], os.getpid()

    remote = ray_cluster.remote(num_cpus=1)(run)
    for setting, cfg, level_mpp in (
        ("none", DetectConfig(candidate_mpp=None), None),
        (1.1, DetectConfig(), 1.0),
    ):
        settings = JobConfig(
            **_BASE,
            zones=("monolayer",),
            candidate_mpp=setting,
            thumbnails=False,
            region_task_mpx=2,
            region_tasks_in_flight=2,
        ).detect_settings()
        cells, crops, out, pid = ray_cluster.get(remote.remote(ref, settings), timeout=300)
        assert out["status"] == "ok", out["reason"]
        assert out["zoning"] == "zoned" and out["region_tasks"] >= 2, out
        assert out["region_tasks_fanned_out"] is True
        assert out["region_workers"] and all(
            not w.endswith(f":{pid}") for w in out["region_workers"]
        )
        assert out["candidate_mpp"] == level_mpp
        want = detect_slide(smear.path, cfg, zones=True)
        # merged across region borders in reading order, exactly as in one process
        got = {(c["centroid_x"], c["centroid_y"]): c for c in cells}
        assert set(got) == {(r["centroid_x"], r["centroid_y"]) for r in want.records}
        for rec in want.records:
            c = got[rec["centroid_x"], rec["centroid_y"]]
            assert all(c[k] == v for k, v in rec.items() if k != "source"), (setting, c, rec)
