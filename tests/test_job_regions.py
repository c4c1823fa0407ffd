"""Issue 14 items 3 and 5 in the job: ``--zones auto`` (the default) zones whole smears and reads
field mosaics whole; a zoned slide whose plan has several region tasks runs them as Ray tasks of
their own, and the slide's cells are still exactly ``detect_slide``'s, committed once; a region
task that fails makes its slide fail with a one-line reason while the run goes on."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline.errors import ConfigError
from pipeline.job.config import JobConfig, load_config
from pipeline.job.listing import SlidePart, SlideRef
from pipeline.job.stage_detect import DetectSettings, process_slide, records
from pipeline.whole_smear import DEFAULT_DATA_DIR, SmearSpec, build_whole_smear
from pipeline.zones import ZONE_NAMES

_DATA = pytest.mark.skipif(
    not (DEFAULT_DATA_DIR / "txl_pbc").is_dir(), reason="shared data not present"
)
_BASE = {"input": "/tmp/in", "output": "/tmp/out"}
# A 3.2 x 0.8 mm smear (12,800 x 3,200 px at 0.25 µm/px, 2.56 mm²): ~56 monolayer white cells,
# several seconds to detect; with region tasks of 1 Mpx its plan has at least 3 of them.
_SPEC = dict(
    width_mm=3.2,
    height_mm=0.8,
    seed=21,
    source="pbc",
    monolayer_fraction=0.35,
    wbc_per_mm2=60.0,
)
_REGION_MPX = 1
_BUDGET = 9
# --zones auto's threshold in these tests: the smear (2.56 mm²) is a whole smear, a sample field
# mosaic (2800 x 2160 px at 0.072 µm/px: 0.03 mm²) is not.
_MIN_AREA = 1.0


@pytest.fixture(scope="module")
def smear(tmp_path_factory):
    return build_whole_smear(tmp_path_factory.mktemp("jr"), SmearSpec(**_SPEC), name="jr")


@pytest.fixture(scope="module")
def broken(smear, tmp_path_factory) -> Path:
    """The smear with every level-0 tile of its second region task zeroed (a real unreadable
    region: its JPEG tiles no longer decode), the low levels (zones, plan) intact."""
    from pipeline.detect import DetectConfig, plan_smear
    from pipeline.slides import open_slide

    dst = tmp_path_factory.mktemp("jr-broken") / "broken.svs"
    shutil.copy(smear.path, dst)
    with open_slide(str(dst)) as slide:
        plan = plan_smear(slide, DetectConfig(), max_task_px=_REGION_MPX * 10**6)
    assert len(plan.tasks) >= 3
    boxes = plan.tasks[1].boxes
    with tifffile.TiffFile(dst) as tf:
        page = tf.pages[0]
        tw, th = page.tilewidth, page.tilelength
        per_row = -(-page.imagewidth // tw)
        tiles = {
            (y // th) * per_row + x // tw
            for b in boxes
            for y in range(b[1], b[3], th)
            for x in range(b[0], b[2], tw)
        }
        spans = [(page.dataoffsets[i], page.databytecounts[i]) for i in sorted(tiles)]
    with open(dst, "r+b") as f:
        for offset, n in spans:
            f.seek(offset)
            f.write(b"\0" * n)
    return dst


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory) -> Path:
    from pipeline.samples import build_sample_slides

    return build_sample_slides(tmp_path_factory.mktemp("jr-samples"))[1].path  # the SVS


def _ref(path: Path, sid: str = "cd" * 16) -> SlideRef:
    size = path.stat().st_size
    return SlideRef(
        sid, str(path), "e", size, (SlidePart(str(path), path.name, size, "e"),), path.name
    )


def _seed(sid: str) -> int:
    return int(sid[:15], 16)  # stage_detect's budget seed: from the slide identity


def _load(argv: list[str]) -> JobConfig:
    import argparse

    from pipeline.cli.run import add_arguments, overrides_from

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--input=/tmp/in", "--output=/tmp/out", *argv])
    return load_config(None, overrides_from(args))


# -- settings -------------------------------------------------------------------------------------
@pytest.mark.unit
def test_zones_auto_is_the_default_and_zones_only_large_slides():
    d = JobConfig(**_BASE).detect_settings()
    assert JobConfig(**_BASE).zones == ("auto",)
    assert (d.zones, d.zone_min_area_mm2) == (("monolayer",), 20.0)
    assert (d.region_task_px, d.region_tasks_in_flight, d.region_task_cpus) == (
        64_000_000,
        4,
        1.0,
    )
    # none (or an empty list): every slide whole, as before zones existed
    for none in (("none",), ("None",), ()):
        dn = JobConfig(**_BASE, zones=none).detect_settings()
        assert (dn.zones, dn.zone_min_area_mm2) == ((), None), none
    # zones named: every slide zoned, whatever its size
    dz = JobConfig(**_BASE, zones=("feathered", "monolayer")).detect_settings()
    assert (dz.zones, dz.zone_min_area_mm2) == (("feathered", "monolayer"), None)
    cli = _load(
        [
            "--zones",
            "AUTO",
            "--zone-min-area-mm2",
            "5.5",
            "--region-task-mpx",
            "16",
            "--region-tasks-in-flight",
            "0",
            "--detect-cpus",
            "0.5",
        ]
    )
    dc = cli.detect_settings()
    assert (dc.zones, dc.zone_min_area_mm2, dc.region_task_px) == (("monolayer",), 5.5, 16 * 10**6)
    assert (dc.region_tasks_in_flight, dc.region_task_cpus) == (0, 0.5)
    assert cli.to_json_dict()["zones"] == ["auto"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kw", "flag"),
    [
        ({"zones": ("auto", "monolayer")}, "--zones (config key zones)"),
        ({"zones": ("none", "thick")}, "--zones (config key zones)"),
        ({"zones": ("automatic",)}, "--zones (config key zones)"),
        ({"zone_min_area_mm2": 0}, "--zone-min-area-mm2 (config key zone_min_area_mm2)"),
        ({"zone_min_area_mm2": -3.0}, "--zone-min-area-mm2 (config key zone_min_area_mm2)"),
        ({"zone_min_area_mm2": "big"}, "--zone-min-area-mm2 (config key zone_min_area_mm2)"),
        ({"region_task_mpx": 0}, "--region-task-mpx (config key region_task_mpx)"),
        ({"region_task_mpx": 2.5}, "--region-task-mpx (config key region_task_mpx)"),
        (
            {"region_tasks_in_flight": -1},
            "--region-tasks-in-flight (config key region_tasks_in_flight)",
        ),
        (
            {"region_tasks_in_flight": True},
            "--region-tasks-in-flight (config key region_tasks_in_flight)",
        ),
        (
            {"region_tasks_in_flight": 5000},
            "--region-tasks-in-flight (config key region_tasks_in_flight)",
        ),
    ],
)
def test_bad_zone_and_region_settings_are_one_line_errors_naming_the_flag(kw, flag):
    with pytest.raises(ConfigError) as err:
        JobConfig(**_BASE, **kw)
    msg = str(err.value)
    assert msg.startswith(flag) and "\n" not in msg, msg


@pytest.mark.unit
def test_bad_zones_on_the_command_line_say_auto_stands_alone():
    with pytest.raises(ConfigError, match=r"^--zones .*'auto,monolayer'.*auto stands alone"):
        _load(["--zones", "auto,monolayer"])


# -- --zones auto in the detect stage -------------------------------------------------------------
def _run(ref: SlideRef, **kw) -> tuple[list[dict], dict]:
    kw.setdefault("region_tasks_in_flight", 0)  # no Ray here, even when a test started it
    recs = [
        r
        for b in process_slide(ref, DetectSettings(s3=None, thumbnails=False, **kw))
        for r in records(b)
    ]
    return recs[:-1], recs[-1]


@pytest.mark.unit
@_DATA
def test_auto_zones_a_whole_smear_and_reads_a_field_mosaic_whole(smear, mosaic):
    from pipeline.detect import detect_slide

    auto = {"zones": ("monolayer",), "zone_min_area_mm2": _MIN_AREA, "max_cells": 5}
    cells, out = _run(_ref(Path(smear.path)), **auto)
    assert out["status"] == "ok", out["reason"]
    assert out["zoning_rule"] == "auto_zoned" and out["area_mm2"] == pytest.approx(2.56, rel=1e-3)
    assert out["zoning"] == "zoned"  # stored in slides/
    assert out["zones_selected"] == ["monolayer"] and set(out["zone_areas_mm2"]) == set(ZONE_NAMES)
    assert {c["smear_zone"] for c in cells} == {"monolayer"} and len(cells) == 5
    # the field mosaic: read whole, exactly as with zones off
    cells, out = _run(_ref(mosaic), **auto)
    assert out["status"] == "ok", out["reason"]
    assert out["zoning_rule"] == "auto_whole" and out["area_mm2"] < 0.05
    assert out["zoning"] == "whole"
    assert out["zones_selected"] is None and out["zone_map_png"] is None
    whole = detect_slide(mosaic, max_cells=5, seed=_seed("cd" * 16))
    assert [(c["centroid_x"], c["centroid_y"]) for c in cells] == [
        (r["centroid_x"], r["centroid_y"]) for r in whole.records
    ]
    assert {c["smear_zone"] for c in cells} == {""}  # null
    # under the default threshold (20 mm²) this small smear would be read whole too
    from pipeline.job.stage_detect import _zoning
    from pipeline.slides import open_slide

    with open_slide(smear.path) as slide:
        for limit, want in ((20.0, "auto_whole"), (2.55, "auto_zoned"), (2.57, "auto_whole")):
            settings = DetectSettings(s3=None, zones=("monolayer",), zone_min_area_mm2=limit)
            assert _zoning(slide, settings)[0] == want, limit
        assert _zoning(slide, DetectSettings(s3=None, zones=("thick",)))[0] == "chosen"
        assert _zoning(slide, DetectSettings(s3=None))[0] == "off"


@pytest.mark.unit
@_DATA
def test_a_zoned_read_is_limited_by_the_area_it_plans_not_the_whole_level(smear):
    """A 5 GP smear's detection level (level 0 at 0.25 µm/px: 5.0e9 px) is over the 2**32 px
    guard, its monolayer is not: the guard applies to what a zoned read plans to detect on."""
    from pipeline.detect import DetectConfig, detect_slide, plan_smear
    from pipeline.errors import SlideTooLargeError
    from pipeline.job.stage_detect import _find_cells
    from pipeline.slides import open_slide

    ref = _ref(Path(smear.path))
    settings = DetectSettings(
        s3=None, zones=("monolayer",), max_cells=1, region_tasks_in_flight=0, thumbnails=False
    )
    with open_slide(smear.path) as slide:
        level_px = slide.dimensions[0] * slide.dimensions[1]  # detection level 0: 41 Mpx
        plan = plan_smear(slide, DetectConfig())
        planned = sum(t.area_px for t in plan.tasks)
        assert plan.level == 0 and planned < level_px // 2
        small = DetectConfig(max_detect_pixels=planned + 1)  # the level is over it
        # read whole, the level counts; zoned (the stage, or detect_slide), the planned area
        with pytest.raises(SlideTooLargeError, match="detection level 0 is 12800x3200 px"):
            detect_slide(slide, small)
        assert len(detect_slide(slide, small, zones=plan.zone_map, max_cells=1).records) == 1
        assert _find_cells(slide, ref, settings, small, {}).count == 1
        over = DetectConfig(max_detect_pixels=planned - 1)
        with pytest.raises(SlideTooLargeError, match=f"^{ref.uri}: the chosen zones cover"):
            _find_cells(slide, ref, settings, over, {})


@pytest.mark.unit
def test_a_region_tasks_failure_is_the_slides_one_line_reason_and_class():
    """What ``ray.get`` raises for a region task (Ray's own exception classes, no cluster): the
    task's exception keeps its class; a worker that died on every attempt is worker_died."""
    import ray

    from pipeline.errors import SlideReadError
    from pipeline.job.stage_detect import _region_error, failure_class

    ref = _ref(Path(__file__))
    raised = ray.exceptions.RayTaskError(
        "_region_task",
        "Traceback (most recent call last):\n  File x\nSlideReadError: ...",
        SlideReadError(ref.uri, "tile read failed at level 0: Not a JPEG file"),
    ).as_instanceof_cause()
    crashed = ray.exceptions.WorkerCrashedError()
    oom = ray.exceptions.OutOfMemoryError(
        "Task was killed due to the node running low on memory.\n..."
    )
    for exc, cls, text in (
        (raised, "slide", "tile read failed at level 0: Not a JPEG file"),
        (crashed, "worker_died", "worker process died on each of 3 attempts (WorkerCrashedError"),
        (oom, "worker_died", "(OutOfMemoryError: Task was killed due to the node running low"),
    ):
        err = _region_error(ray, exc, ref, 1, 5, 3)
        assert failure_class(err.cause) == cls
        assert err.reason.startswith(f"{type(err.cause).__name__}: {ref.uri}: region task 2 of 5: ")
        assert text in err.reason and "\n" not in err.reason, err.reason


# -- region tasks ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def expected(smear):
    """detect_slide's cells of the smear in one process: every monolayer cell, and the budget's."""
    from pipeline.detect import detect_slide

    full = detect_slide(smear.path, zones=True)
    budget = detect_slide(smear.path, zones=True, max_cells=_BUDGET, seed=_seed("cd" * 16))
    return full, budget


def _in_ray(ray, ref: SlideRef, **kw):
    """process_slide in a Ray task of its own, as the job's detect stage runs it: its rows, crops
    and pid."""

    def run(ref, kw):
        rows, crops = [], []
        for b in process_slide(ref, DetectSettings(s3=None, thumbnails=False, **kw)):
            rows += records(b)
            crops += [b["crop"][i] for i in range(len(b["kind"])) if b["kind"][i] == "cell"]
        return rows, crops, os.getpid()

    return ray.get(ray.remote(num_cpus=1)(run).remote(ref, kw), timeout=300)


def _key(rec: dict) -> tuple[float, float]:
    return rec["centroid_x"], rec["centroid_y"]


@pytest.mark.integration
@_DATA
def test_region_tasks_run_apart_and_give_detect_slides_cells_and_crops(
    ray_cluster, smear, expected
):
    full, budget = expected
    ref = _ref(Path(smear.path))
    for kw, want in (({}, full), ({"max_cells": _BUDGET}, budget)):
        rows, crops, pid = _in_ray(
            ray_cluster,
            ref,
            zones=("monolayer",),
            region_task_px=_REGION_MPX * 10**6,
            region_tasks_in_flight=2,
            **kw,
        )
        cells, out = rows[:-1], rows[-1]
        assert out["status"] == "ok", out["reason"]
        assert out["region_tasks"] >= 3, out
        if kw:
            # A budget reads fields until it is met, in the slide's own task: not fanned out.
            assert out["region_tasks_fanned_out"] is False and out["region_workers"] is None
            assert out["cells_total_estimated"] is True
        else:
            # fanned out: several region tasks, none of them run by the slide's own process
            assert out["region_tasks_fanned_out"] is True, out
            workers = out["region_workers"]
            assert workers and all(not w.endswith(f":{pid}") for w in workers), (pid, workers)
            assert 0 < out["region_peak_rss_mib"] < 2048
        # exactly detect_slide's cells, records (numbering, QC flags, morphometry) and crops
        assert out["cell_count"] == len(cells) == len(want.records)
        got = {_key(c): (c, crop) for c, crop in zip(cells, crops, strict=True)}
        assert len(got) == len(cells)
        assert set(got) == {_key(r) for r in want.records}
        zones = dict(zip(map(_key, want.records), want.cell_zones, strict=True))
        for rec, crop in zip(want.records, want.crops, strict=True):
            c, got_crop = got[_key(rec)]
            for name, value in rec.items():
                if name == "qc_flags":
                    assert c["qc_flags"] == value, (name, c, rec)
                elif name != "source":
                    assert c[name] == value, (name, c[name], value)
            assert c["smear_zone"] == zones[_key(rec)]["smear_zone"]
            assert np.array_equal(got_crop, crop)
        info = want.info
        assert out["cells_total"] == info["cells_total"] and out["sampled"] == info["sampled"]
        assert out["cells_outside_zones"] == info["cells_outside_zones"]
        assert out["zone_areas_mm2"] == info["zones"]["areas_mm2"]


@pytest.mark.integration
@_DATA
def test_job_commits_a_fanned_out_slide_once_and_a_broken_region_fails_only_its_slide(
    s3_server, ray_cluster, smear, broken, mosaic, expected
):
    from job_helpers import job_config, new_bucket, put, read_table

    from pipeline.job import run_job
    from pipeline.job.identity import cell_id

    bucket = new_bucket(s3_server)
    put(s3_server, bucket, "slides/smear.svs", Path(smear.path))
    put(s3_server, bucket, "slides/broken.svs", broken)
    put(s3_server, bucket, "slides/mosaic.svs", mosaic)
    cfg = job_config(
        s3_server,
        bucket,
        zone_min_area_mm2=_MIN_AREA,  # --zones auto is the default
        region_task_mpx=_REGION_MPX,
        region_tasks_in_flight=2,
        max_failed_fraction=0.5,
        thumbnails=False,
    )
    lines: list[str] = []
    result = run_job(cfg, say=lines.append)
    assert (result.ok, result.failed, result.exit_code) == (2, 1, 0), result.slides
    rows = {r["slide_uri"].rsplit("/", 1)[1]: r for r in result.slides}
    # the smear: zoned, fanned out, exactly detect_slide's cells, committed once as one slide
    row = rows["smear.svs"]
    assert (row["status"], row["zoning_rule"], row["zones_selected"]) == (
        "ok",
        "auto_zoned",
        ["monolayer"],
    )
    assert row["region_tasks"] >= 3 and row["region_workers"], row
    full, _ = expected
    want = {cell_id(row["slide_id"], *_key(r)) for r in full.records}
    cells = read_table(cfg, "cells")
    ids = [
        c
        for c, s in zip(cells.column("cell_id").to_pylist(), cells.column("slide_id").to_pylist())
        if s == row["slide_id"]
    ]
    assert len(ids) == len(set(ids)) == row["cell_count"] == len(want)
    assert set(ids) == want
    slides = read_table(cfg, "slides").to_pylist()
    assert [s["slide_id"] for s in slides].count(row["slide_id"]) == 1
    # slides/ stores how each slide was read (schema version 3)
    stored = {s["slide_uri"].rsplit("/", 1)[1]: s for s in slides}
    read = ("zoning", "region_tasks", "region_tasks_fanned_out", "candidate_mpp")
    assert [stored["smear.svs"][k] for k in read] == ["zoned", row["region_tasks"], True, 1.0]
    assert [stored["mosaic.svs"][k] for k in read] == ["whole", None, None, None]
    assert stored["broken.svs"]["zoning"] == "zoned" and stored["broken.svs"]["status"] == "failed"
    # the broken smear: failed as the slide, one line naming the region task and the object
    bad = rows["broken.svs"]
    assert (bad["status"], bad["failure_class"], bad["cell_count"]) == ("failed", "slide", 0)
    assert "\n" not in bad["reason"] and "region task " in bad["reason"], bad["reason"]
    assert bad["reason"].startswith(f"SlideReadError: s3://{bucket}/slides/broken.svs: region task")
    assert not [s for s in cells.column("slide_id").to_pylist() if s == bad["slide_id"]]
    # the field mosaic: --zones auto read it whole
    mos = rows["mosaic.svs"]
    assert (mos["status"], mos["zoning_rule"], mos["zones_selected"]) == ("ok", "auto_whole", None)
    assert mos["region_tasks"] is None and mos["cell_count"] > 0
    assert any("FAILED" in ln and "broken.svs" in ln and "region task" in ln for ln in lines)
