"""Issue 14 in the job: ``--zones`` / ``--max-cells-per-slide`` reach the detect stage, the cells
carry ``smear_zone``/``rbc_density``, the slides rows carry the zone areas, the cells counted
outside the chosen zones, the budget and the zone-map PNG; outputs written before these columns
stay readable; the report shows the zone map (escaped, re-encoded)."""

from __future__ import annotations

import base64
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.job.config import JobConfig, load_config
from pipeline.job.listing import SlidePart, SlideRef
from pipeline.job.stage_detect import (
    DetectSettings,
    _cell_batch,
    failure_class,
    process_slide,
    records,
)
from pipeline.job.storage import storage_for
from pipeline.job.writer import OutputWriter
from pipeline.schema import CELL_SCHEMA, SCHEMA_VERSION, SLIDE_SCHEMA
from pipeline.whole_smear import DEFAULT_DATA_DIR, SmearSpec, build_whole_smear
from pipeline.zones import ZONE_NAMES, ZoneError

_DATA = pytest.mark.skipif(
    not (DEFAULT_DATA_DIR / "txl_pbc").is_dir(), reason="shared data not present"
)
_BASE = {"input": "/tmp/in", "output": "/tmp/out"}
# A 1.6 x 0.8 mm smear (6400 x 3200 px at 0.25 µm/px): ~26 monolayer white cells, a few more in
# the margins read around it; seconds to build and to detect.
_SPEC = dict(
    width_mm=1.6,
    height_mm=0.8,
    seed=21,
    source="pbc",
    monolayer_fraction=0.35,
    wbc_per_mm2=60.0,
)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smear(tmp_path_factory):
    return build_whole_smear(tmp_path_factory.mktemp("jz"), SmearSpec(**_SPEC), name="jz")


def _ref(path: Path, sid: str = "ab" * 16) -> SlideRef:
    size = path.stat().st_size
    return SlideRef(
        sid, str(path), "e", size, (SlidePart(str(path), path.name, size, "e"),), path.name
    )


def _run(ref: SlideRef, **kw) -> tuple[list[dict], dict]:
    recs = [
        r
        for b in process_slide(ref, DetectSettings(s3=None, thumbnails=False, **kw))
        for r in records(b)
    ]
    return recs[:-1], recs[-1]


# -- settings -------------------------------------------------------------------------------------
@pytest.mark.unit
def test_zone_settings_reach_the_detect_stage():
    cfg = JobConfig(**_BASE, zones=("Monolayer", "feathered", "monolayer"), max_cells_per_slide=200)
    assert cfg.zones == ("monolayer", "feathered")
    d = cfg.detect_settings()
    assert (d.zones, d.max_cells) == (("monolayer", "feathered"), 200)
    # the default job zones whole smears only (--zones auto), without a budget; none: whole
    d0 = JobConfig(**_BASE).detect_settings()
    assert (d0.zones, d0.zone_min_area_mm2, d0.max_cells) == (("monolayer",), 20.0, None)
    assert JobConfig(**_BASE, zones=("none",)).detect_settings().zones == ()
    cli = _load(
        ["--zones", "monolayer,thick", "--zones", "feathered", "--max-cells-per-slide", "3"]
    )
    assert cli.zones == ("monolayer", "thick", "feathered") and cli.max_cells_per_slide == 3


def _load(argv: list[str]) -> JobConfig:
    import argparse

    from pipeline.cli.run import add_arguments, overrides_from

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--input=/tmp/in", "--output=/tmp/out", *argv])
    return load_config(None, overrides_from(args))


@pytest.mark.unit
@pytest.mark.parametrize(
    "zones",
    [
        ("centre",),
        ("monolayer", "edge"),
        ("glass;thick",),
        ("monolayer\u200b",),
        ["monolayer", 3],
        5,
    ],
)
def test_bad_zones_are_one_line_errors_naming_the_flag(zones):
    with pytest.raises(ConfigError) as err:
        JobConfig(**_BASE, zones=zones)
    msg = str(err.value)
    assert msg.startswith("--zones (config key zones)") and "\n" not in msg, msg


@pytest.mark.unit
@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "7", 2**40])
def test_bad_cell_budget_is_a_one_line_error_naming_the_flag(bad):
    with pytest.raises(ConfigError) as err:
        JobConfig(**_BASE, max_cells_per_slide=bad)
    msg = str(err.value)
    assert msg.startswith("--max-cells-per-slide (config key max_cells_per_slide)"), msg
    assert "\n" not in msg


@pytest.mark.unit
def test_bad_zones_on_the_command_line_name_the_flag():
    with pytest.raises(ConfigError, match=r"^--zones .*'edge'.*glass, thick, monolayer, feathered"):
        _load(["--zones", "monolayer,edge"])


@pytest.mark.unit
def test_a_slide_that_cannot_be_zoned_fails_as_the_slide():
    assert failure_class(ZoneError("s3://b/x.svs: nothing stained")) == "slide"


# -- the detect stage -----------------------------------------------------------------------------
@pytest.mark.unit
@_DATA
def test_process_slide_describes_the_monolayer_and_records_the_zones(smear):
    ref = _ref(Path(smear.path))
    cells, out = _run(ref, zones=("monolayer",), max_cells=5)
    assert out["status"] == "ok", out["reason"]
    assert len(cells) == out["cell_count"] == 5
    assert {c["smear_zone"] for c in cells} == {"monolayer"}
    assert all(0.0 < c["rbc_density"] < 2.0 for c in cells), [c["rbc_density"] for c in cells]
    assert out["zones_selected"] == ["monolayer"]
    areas = out["zone_areas_mm2"]
    assert set(areas) == set(ZONE_NAMES) and areas["monolayer"] > 0.1
    assert sum(areas.values()) == pytest.approx(1.6 * 0.8, rel=0.02)
    assert set(out["cells_outside_zones"]) == set(ZONE_NAMES) - {"monolayer"}
    assert all(isinstance(v, int) and v >= 0 for v in out["cells_outside_zones"].values())
    assert out["sampled"] is True and out["cells_total"] > 5
    png = base64.b64decode(out["zone_map_png"])
    assert png.startswith(_PNG_MAGIC) and max(Image.open(io.BytesIO(png)).size) <= 512
    # the sample is seeded by the slide identity: a re-executed task describes the same cells
    again, _ = _run(ref, zones=("monolayer",), max_cells=5)
    assert [(c["centroid_x"], c["centroid_y"]) for c in again] == [
        (c["centroid_x"], c["centroid_y"]) for c in cells
    ]
    # every cell of the chosen zone without a budget, counted; the budget's total is an
    # estimate from the fields it read
    whole, out_all = _run(ref, zones=("monolayer",))
    assert out_all["sampled"] is False and out_all["cells_total"] == len(whole)
    assert (out_all["cells_total_estimated"], out["cells_total_estimated"]) == (False, True)
    assert len(whole) / 3 <= out["cells_total"] <= 3 * len(whole)


@pytest.mark.unit
def test_zone_columns_are_null_when_zones_are_off():
    from pipeline.job.stage_caption import OUTPUT_KEYS
    from pipeline.job.stage_detect import CELL_FIELDS
    from pipeline.job.stage_write import cells_table

    ref = _ref(Path(__file__))
    ints = {name: 0 for name, dtype in CELL_FIELDS if dtype in (np.int32, np.int64)}
    recs = [{**ints, "centroid_x": float(i), "centroid_y": 1.0} for i in range(2)]
    crops = np.zeros((2, 16, 16, 3), np.uint8)
    off = _cell_batch("s", ref, crops, recs, [b"", b""])
    on = _cell_batch(
        "s",
        ref,
        crops,
        recs,
        [b"", b""],
        [{"smear_zone": "monolayer", "rbc_coverage": 0.7, "rbc_per_1000um2": 16.0}] * 2,
    )
    # no caption: every caption column null
    floats = ("caption_logprob", "cell_type_confidence", "caption_seconds", "caption_started")
    caption = {
        k: np.full(2, np.nan) if k in floats else np.full(2, "", dtype=object) for k in OUTPUT_KEYS
    }
    base = dict.fromkeys(
        ("run_id", "model_id", "model_version", "pipeline_version", "schema_version"), "r"
    )
    for batch, zone, dens in ((off, None, None), (on, "monolayer", 0.7)):
        t = cells_table({**batch, **caption}, np.arange(2), base)
        assert t.column("smear_zone").to_pylist() == [zone, zone]
        assert t.column("rbc_density").to_pylist() == [dens, dens]
    assert CELL_SCHEMA.field("rbc_density").metadata[b"unit"].startswith(b"red-cell layers")
    with pytest.raises(ValueError):
        _cell_batch("s", ref, crops, recs, [b"", b""], [{}])


# -- slides rows: written, read back, old files still readable ------------------------------------
def _png(size=(40, 20), text: str | None = None) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if text:
        info.add_text("Comment", text)
    buf = io.BytesIO()
    Image.new("RGB", size, (52, 160, 84)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def _zone_row(sid: str, png: bytes | str | None, **kw) -> dict:
    row = {
        "slide_id": sid,
        "slide_uri": f"s3://b/{sid}.svs",
        "status": "ok",
        "cell_count": 1,
        "width": 6400,
        "height": 3200,
        "mpp": 0.25,
        "mpp_source": "metadata",
        "run_id": "r2",
        "model_version": "v1",
        "zones_selected": ["monolayer"],
        "zone_areas_mm2": {"glass": 0.5, "thick": 0.2, "monolayer": 0.44, "feathered": 0.11},
        "cells_outside_zones": {"glass": 2, "thick": 3, "feathered": 0},
        "cells_total": 26,
        "sampled": True,
        "zone_map_png": base64.b64encode(png).decode() if isinstance(png, bytes) else png,
    }
    row.update(kw)
    return row


def _old_schema(schema: pa.Schema, new: tuple[str, ...]) -> pa.Schema:
    return pa.schema([f for f in schema if f.name not in new])


_NEW_SLIDE = (
    "zones_selected",
    "zone_areas_mm2",
    "cells_outside_zones",
    "cells_total",
    "sampled",
    "zone_map_png",
)


def _write_v1(root: Path, sid: str) -> None:
    """A slide and its cell as schema version 1 wrote them (no zone columns)."""
    day = "run_date=2026-01-01"
    for table, schema, rows in (
        (
            "slides",
            _old_schema(SLIDE_SCHEMA, _NEW_SLIDE),
            [
                {
                    "slide_id": sid,
                    "slide_uri": f"s3://b/{sid}.svs",
                    "status": "ok",
                    "cell_count": 1,
                    "run_id": "r1",
                    "model_version": "v1",
                    "finished_at": datetime(2026, 1, 1, tzinfo=UTC),
                }
            ],
        ),
        (
            "cells",
            _old_schema(CELL_SCHEMA, ("smear_zone", "rbc_density")),
            [
                {
                    "cell_id": f"{sid}-0",
                    "slide_id": sid,
                    "slide_uri": f"s3://b/{sid}.svs",
                    "cell_index": 0,
                    "centroid_x": 5.0,
                    "centroid_y": 5.0,
                    "run_id": "r1",
                    "schema_version": "1",
                }
            ],
        ),
    ):
        d = root / table / day
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), d / "part-v1.parquet")


def _commit_v2(root: Path, rows: list[dict]) -> None:
    w = OutputWriter(storage_for(str(root)), str(root), "r2", "2026-01-02", "v1")
    cells = [
        {
            "cell_id": f"{r['slide_id']}-0",
            "slide_id": r["slide_id"],
            "slide_uri": r["slide_uri"],
            "cell_index": 0,
            "centroid_x": 9.0,
            "centroid_y": 9.0,
            "run_id": "r2",
            "smear_zone": "monolayer",
            "rbc_density": 0.7,
            "schema_version": SCHEMA_VERSION,
        }
        for r in rows
    ]
    w.commit_chunk(cells, rows)


@pytest.mark.unit
def test_slides_rows_store_the_zones_and_old_outputs_stay_readable(tmp_path):
    from pipeline.query import connect

    png = _png()
    _write_v1(tmp_path, "old")
    _commit_v2(tmp_path, [_zone_row("new", png)])
    con = connect(str(tmp_path))
    rows = {
        r[0]: r[1:]
        for r in con.execute(
            "SELECT slide_id, zone_areas_mm2['monolayer'], cells_outside_zones['thick'], "
            "cells_total, sampled, zone_map_png, zones_selected FROM slides"
        ).fetchall()
    }
    assert rows["new"] == (0.44, 3, 26, True, png, ["monolayer"])
    assert rows["old"] == (None,) * 6
    zones = dict(con.execute("SELECT cell_id, smear_zone FROM cells").fetchall())
    assert zones == {"new-0": "monolayer", "old-0": None}
    assert SCHEMA_VERSION == "4"


# -- the report -----------------------------------------------------------------------------------
@pytest.mark.unit
def test_report_shows_the_zone_map_escaped_and_re_encoded(tmp_path):
    from pipeline.report import build_report

    hostile = "<script>alert(1)</script>"
    good = _png(text=hostile)
    _write_v1(tmp_path, "old")
    _commit_v2(
        tmp_path,
        [
            _zone_row("zgood", good),
            _zone_row(
                "zevil",
                b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>",
                zones_selected=[hostile],
                zone_areas_mm2={hostile: 1.0, "monolayer": 0.3},
                cells_outside_zones={"x' onerror='alert(1)": 4},
            ),
            _zone_row("zhuge", _png(size=(4000, 8))),
        ],
    )
    out = tmp_path / "r.html"
    build_report(str(tmp_path), out)
    html = out.read_text(encoding="utf-8")
    assert hostile not in html and "onerror='alert" not in html and "onload" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    imgs = [part.split("'", 1)[0] for part in html.split("src='data:image/png;base64,")[1:]]
    assert len(imgs) == 1  # only the good PNG; the SVG and the 4000-px one are left out
    shown = base64.b64decode(imgs[0])
    assert (
        shown.startswith(_PNG_MAGIC) and hostile.encode() not in shown
    )  # re-encoded: no text chunk
    assert Image.open(io.BytesIO(shown)).size == (40, 20)
    assert "No readable zone map stored" in html
    good_block = html.split("id='slide-zgood'")[1].split("class='slide'")[0]
    for text in ("monolayer", "0.44", "3 seen, not described", "1 of 26 cells described"):
        assert text in good_block, text
    # the slide written before the zone columns has no zone panel
    old_block = html.split("id='slide-old'")[1].split("class='slide'")[0]
    assert "Smear zones" not in old_block


# -- one job run ----------------------------------------------------------------------------------
@pytest.mark.integration
@_DATA
def test_job_with_zones_writes_the_columns_and_the_report_shows_the_map(
    s3_server, ray_cluster, smear, tmp_path
):
    from job_helpers import job_config, new_bucket, put, read_table

    from pipeline.job import run_job
    from pipeline.report import build_report

    bucket = new_bucket(s3_server)
    put(s3_server, bucket, "slides/jz.svs", Path(smear.path))
    cfg = job_config(s3_server, bucket, zones=("monolayer",), max_cells_per_slide=4)
    result = run_job(cfg)
    assert (result.ok, result.failed, result.exit_code) == (1, 0, 0), result.slides
    from pipeline.job.run import format_summary

    assert "[zones monolayer; 4 of " in format_summary(result, cfg.output)
    cells = read_table(cfg, "cells")
    assert cells.num_rows == 4 and set(cells.column("smear_zone").to_pylist()) == {"monolayer"}
    assert all(0.0 < d < 2.0 for d in cells.column("rbc_density").to_pylist())
    slides = read_table(cfg, "slides")
    assert slides.schema.field("zone_areas_mm2").type == SLIDE_SCHEMA.field("zone_areas_mm2").type
    row = slides.to_pylist()[0]
    assert row["zones_selected"] == ["monolayer"] and row["sampled"] is True
    assert row["cells_total"] > 4 and row["cell_count"] == 4
    assert {k for k, _ in row["zone_areas_mm2"]} == set(ZONE_NAMES)
    assert {k for k, _ in row["cells_outside_zones"]} == set(ZONE_NAMES) - {"monolayer"}
    assert row["zone_map_png"].startswith(_PNG_MAGIC)
    # how it was read (schema version 3): zoned, in the slide's own task (one region, so not
    # fanned out), candidates on the 1.0 µm/px level
    assert (row["zoning"], row["region_tasks"], row["region_tasks_fanned_out"]) == (
        "zoned",
        1,
        False,
    )
    assert row["candidate_mpp"] == 1.0
    assert json.loads(read_table(cfg, "runs").column("config_json")[0].as_py())["zones"] == [
        "monolayer"
    ]
    out = tmp_path / "report.html"
    build_report(cfg.output, out, s3_endpoint=s3_server)
    html = out.read_text(encoding="utf-8")
    assert "src='data:image/png;base64," in html and "Smear zones (described: monolayer)" in html
    # the budget read fields until it was met: its total is an estimate, and says so
    assert row["cells_total_estimated"] is True
    assert f"4 of about {row['cells_total']} cells described" in html
    assert "the total estimated from the fields read" in html
