"""Coarse-to-fine detection on whole smears (``DetectConfig.candidate_mpp``, pipeline.detect):
candidates on the 1.0 µm/px level, verified on level 0 only in the windows their crops read.
Real generated slides (pipeline.whole_smear: JPEG-tiled SVS, 0.25/1.0/4.0 µm/px), real reads
(OpenSlide), counted by pipeline.eval_smear.CountingSlide."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pipeline.detect as detect_mod
from hemblip.crops import crop_box
from pipeline.detect import (
    DetectConfig,
    _candidate_level,
    _centre_margin,
    _verify_window,
    detect_region,
    detect_slide,
    merge_regions,
    plan_smear,
)
from pipeline.detection import DetectorConfig
from pipeline.errors import ConfigError
from pipeline.eval_smear import CountingSlide, match_cells
from pipeline.slides import open_slide
from pipeline.whole_smear import DEFAULT_DATA_DIR, SmearSpec, build_whole_smear
from pipeline.zones import zone_map

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::FutureWarning")]
_DATA = pytest.mark.skipif(
    not (DEFAULT_DATA_DIR / "txl_pbc").is_dir(), reason="shared data not present"
)
_TILE = 256  # CountingSlide's level-0 grid (the generator's JPEG tiles)


def _tiles(box) -> set[tuple[int, int]]:
    x0, y0, x1, y1 = (int(v) for v in box)
    return {
        (tx, ty)
        for ty in range(max(y0, 0) // _TILE, (y1 - 1) // _TILE + 1)
        for tx in range(max(x0, 0) // _TILE, (x1 - 1) // _TILE + 1)
    }


@pytest.fixture(scope="module")
def smear(tmp_path_factory):
    # 1.6 x 0.8 mm at 0.25 µm/px (6,400 x 3,200 px, 20 MP), 30 % monolayer at twice the
    # default white-cell density: ~20 monolayer cells.
    return build_whole_smear(
        tmp_path_factory.mktemp("c2f"),
        SmearSpec(
            width_mm=1.6,
            height_mm=0.8,
            seed=33,
            source="pbc",
            monolayer_fraction=0.3,
            wbc_per_mm2=80.0,
        ),
    )


@pytest.fixture(scope="module")
def runs(smear, request):
    """Both paths on the same slide and zone map, each on its own counting wrapper; the
    coarse-to-fine run also records the candidates handed to verification (the real function
    runs; the wrapper only keeps its argument)."""
    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    cands: list[tuple[float, float]] = []
    verify = detect_mod._verify_cells

    def recording(slide, task, box, parts, cs, cfg, stats):
        cands.extend(cs)
        yield from verify(slide, task, box, parts, cs, cfg, stats)

    mp.setattr(detect_mod, "_verify_cells", recording)
    out = {}
    with open_slide(smear.path) as inner:
        zm = zone_map(inner)
        for name, cfg in (("old", DetectConfig(candidate_mpp=None)), ("new", DetectConfig())):
            slide = CountingSlide(inner)
            res = detect_slide(slide, cfg, zones=zm)
            out[name] = (res, set(slide.tiles0), list(slide.px_read))
        plan = plan_smear(inner, DetectConfig(), zone_map=zm)
        mpp = inner.mpp
        geom = _Geometry(inner.level_dimensions, inner.level_downsamples)
    mp.undo()
    return {**out, "cands": cands, "plan": plan, "mpp": mpp, "zm": zm, "geom": geom}


class _Geometry:
    """A slide's level geometry (what _verify_window reads of it), kept past its closing."""

    def __init__(self, dims, downsamples):
        self.level_dimensions, self.level_downsamples = dims, downsamples


@_DATA
def test_level0_is_read_only_in_the_candidates_windows(runs):
    res, tiles0, px_read = runs["new"]
    plan, mpp = runs["plan"], runs["mpp"]
    assert plan.candidate_level == 1 and res.info["candidate_level"] == 1
    assert all(t.candidate_level == 1 and t.level == 0 for t in plan.tasks)
    cands = runs["cands"]
    assert res.info["candidates"] == len(cands) > 0
    # The windows verification reads (the candidates' crop boxes grown to whole tiles) and,
    # where a described cell's crop moved onto its nucleus, at most the centring margin more.
    allowed = set()
    for c in cands:
        allowed |= _tiles(_verify_window(runs["geom"], 0, c, mpp, 36.0))
    m = _centre_margin(mpp)
    for r in res.records:
        b = crop_box((r["centroid_x"], r["centroid_y"]), mpp, 36.0)
        allowed |= _tiles((b[0] - m, b[1] - m, b[2] + m, b[3] + m))
    assert tiles0 <= allowed, sorted(tiles0 - allowed)[:5]
    # Far fewer level-0 tiles than one stage over the region boxes (which reads every tile
    # under them); the candidate level is read over the boxes instead, a sixteenth of the px.
    old_tiles0 = runs["old"][1]
    assert len(tiles0) < 0.6 * len(old_tiles0), (len(tiles0), len(old_tiles0))
    assert px_read[0] < 0.6 * runs["old"][2][0]
    assert px_read[1] > runs["old"][2][1]  # the candidates' level, beyond the zone map's reads


@_DATA
def test_coarse_to_fine_finds_the_cells_one_stage_finds(smear, runs):
    truth = json.loads(smear.truth_path.read_text())
    boxes = [tuple(w["box"]) for w in truth["wbcs"]]
    # Truth cells of the monolayer by the pipeline's ring rule (as eval-smear counts them).
    mono = {j for j, w in enumerate(truth["wbcs"]) if w.get("ring_zone", w["zone"]) == "monolayer"}
    found = {}
    for name in ("old", "new"):
        res = runs[name][0]
        pts = [(r["centroid_x"], r["centroid_y"]) for r in res.records]
        pairs = match_cells(pts, boxes)
        found[name] = ({j for _, j in pairs} & mono, len(pairs), len(pts))
    old_hit, new_hit = found["old"][0], found["new"][0]
    assert len(mono) >= 15 and len(old_hit) >= 0.8 * len(mono)
    # Every monolayer white cell one stage finds, coarse-to-fine finds too.
    assert old_hit <= new_hit, sorted(old_hit - new_hit)
    # Precision: no more false cells than one stage (matched / described).
    assert found["new"][1] / found["new"][2] >= found["old"][1] / found["old"][2] - 1e-9
    new = runs["new"][0]
    assert new.info["cells_total"] == len(new.records)
    assert all(z["smear_zone"] == "monolayer" for z in new.cell_zones)


@_DATA
def test_budget_path_finds_the_same_cells(smear, runs):
    # detect_region + merge_regions with the plan, as describe_region's path finds them; the
    # budget (fields read one by one, each a window of its own) finds the same cells, within
    # 2 px, and reads every field's cells when the budget exceeds them.
    plan, res = runs["plan"], runs["new"][0]
    with open_slide(smear.path) as slide:
        merged = merge_regions(plan, [detect_region(slide, t, plan=plan) for t in plan.tasks])
        part = detect_slide(slide, zones=runs["zm"], max_cells=5, seed=1)
        every = detect_slide(slide, zones=runs["zm"], max_cells=10**6, seed=1)
    key = [(round(r["centroid_x"], 3), round(r["centroid_y"], 3)) for r in res.records]
    assert [(round(c.centroid[0], 3), round(c.centroid[1], 3)) for c in merged.cells] == key
    assert merged.cells_total == len(res.records)
    assert part.info["cells_total_estimated"] is True and len(part.records) == 5
    whole = np.array(key)
    for r in part.records + every.records:
        assert np.hypot(*(whole - (r["centroid_x"], r["centroid_y"])).T).min() < 2.0
    assert every.info["cells_total"] == len(every.records) == len(res.records)
    assert every.info["cells_total_estimated"] is False


@_DATA
def test_candidate_mpp_none_is_the_one_stage_path(runs):
    # No candidate level in the plan or the tasks; every level-0 tile under the region boxes
    # is read (the one-stage contract); level 1 only by the zone map.
    res, tiles0, px_read = runs["old"]
    assert res.info["candidate_level"] is None and res.info["candidates"] is None
    plan = runs["plan"]
    under = set()
    for t in plan.tasks:
        for b in t.boxes:
            under |= _tiles(b)
    assert under <= tiles0
    assert res.info["verify_fraction"] is None


@_DATA
def test_a_fine_pyramid_keeps_one_stage(tmp_path):
    # 0.1 µm/px level 0 (0.1/0.4/1.6 µm/px): the detection level is already the 0.4 µm/px one,
    # and no coarser level is at most 1.1 µm/px: one stage, cells as with candidate_mpp=None.
    sm = build_whole_smear(
        tmp_path,
        SmearSpec(
            width_mm=0.8, height_mm=0.4, mpp=0.1, seed=5, source="pbc", monolayer_fraction=0.35
        ),
    )
    with open_slide(sm.path) as slide:
        zm = zone_map(slide)
        plan = plan_smear(slide, DetectConfig(), zone_map=zm)
        assert plan.level == 1 and plan.candidate_level is None
        assert all(t.candidate_level is None for t in plan.tasks)
        a = detect_slide(slide, DetectConfig(), zones=zm)
        b = detect_slide(slide, DetectConfig(candidate_mpp=None), zones=zm)
    assert a.records == b.records and a.info["candidate_level"] is None


def test_candidate_level_rule():
    class S:
        level_downsamples = (1.0, 4.0, 16.0)

    cfg = DetectConfig()
    assert _candidate_level(S, 0.25, cfg, 0) == 1  # 1.0 µm/px
    assert _candidate_level(S, 0.2527, cfg, 0) == 1  # Aperio's 0.2527 x 4 = 1.011
    assert _candidate_level(S, 0.3, cfg, 0) is None  # 1.2 µm/px: too coarse, level 0 only
    assert _candidate_level(S, 0.1, cfg, 1) is None  # 0.4 is the detection level itself
    assert _candidate_level(S, 0.25, DetectConfig(candidate_mpp=4.0), 0) == 2
    assert _candidate_level(S, 0.25, DetectConfig(candidate_mpp=None), 0) is None
    # The detection level already at the candidate level (max_detect_mpp 1.1): one stage.
    assert _candidate_level(S, 0.25, cfg, 1) is None


@pytest.mark.parametrize("bad", [0, -1.0, 0.3, 5.5, float("nan"), float("inf"), True, "1.1"])
def test_bad_candidate_mpp_is_one_clear_error(bad):
    with pytest.raises(ConfigError, match="--candidate-mpp"):
        DetectConfig(candidate_mpp=bad)


def test_candidate_mpp_bounds_follow_the_working_resolution():
    assert DetectConfig().candidate_mpp == 1.1
    assert DetectConfig(candidate_mpp=0.5).candidate_mpp == 0.5
    with pytest.raises(ConfigError, match="working_mpp = 1.0"):
        DetectConfig(candidate_mpp=0.8, detector=DetectorConfig(working_mpp=1.0))
