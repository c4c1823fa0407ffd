"""Zone-limited detection on whole smears (pipeline.detect zones path) and the cell budget
(pipeline.smear_sampling)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.detect import (
    DetectConfig,
    RegionTask,
    _check_select,
    _task_windows,
    detect_region,
    detect_slide,
    measure_cells,
    merge_regions,
    plan_smear,
    sample_fields,
    split_regions,
)
from pipeline.errors import ConfigError
from pipeline.eval_smear import CountingSlide, match_cells
from pipeline.slides import open_slide
from pipeline.smear_sampling import balanced_order, spatial_sample
from pipeline.whole_smear import DEFAULT_DATA_DIR, SmearSpec, build_whole_smear

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::FutureWarning")]
_DATA = pytest.mark.skipif(
    not (DEFAULT_DATA_DIR / "txl_pbc").is_dir(), reason="shared data not present"
)


# -- sampling (pure) ------------------------------------------------------------------------------
def _quadrant_counts(pts, idx, w, h):
    p = pts[idx]
    q = (p[:, 0] >= w / 2).astype(int) + 2 * (p[:, 1] >= h / 2).astype(int)
    return np.bincount(q, minlength=4)


def test_sample_is_deterministic_by_seed_and_sized():
    pts = np.random.default_rng(1).uniform(0, 1000, (5000, 2))
    a, b, c = (
        spatial_sample(pts, 300, seed=7),
        spatial_sample(pts, 300, seed=7),
        spatial_sample(pts, 300, seed=8),
    )
    assert len(a) == 300 and len(set(a.tolist())) == 300
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.all(np.diff(a) > 0)


def test_sample_spreads_like_the_area_not_the_reading_order():
    # Points uniform over an L-shaped zone: quadrant shares of the sample match area shares
    # (top-left, top-right, bottom-left hold 1/3 each; bottom-right none).
    rng = np.random.default_rng(2)
    pts = rng.uniform(0, 1000, (20000, 2))
    pts = pts[~((pts[:, 0] >= 500) & (pts[:, 1] >= 500))]
    for seed in range(5):
        counts = _quadrant_counts(pts, spatial_sample(pts, 300, seed=seed), 1000, 1000)
        assert counts[3] == 0
        # Spatial balance: within 6 % of 100 each (a simple random sample's sd is ~8).
        assert np.all(np.abs(counts[:3] - 100) <= 6), counts
    # The first N in reading order would take only the top half.
    first = np.argsort(pts[:, 1])[:300]
    assert _quadrant_counts(pts, first, 1000, 1000)[2] == 0


def test_sample_gives_every_point_the_same_chance():
    # Dense cluster + sparse rest: inclusion frequency is n/N everywhere (unbiased differential).
    rng = np.random.default_rng(3)
    pts = np.vstack([rng.uniform(0, 100, (900, 2)), rng.uniform(0, 1000, (100, 2))])
    hits = np.zeros(len(pts))
    for seed in range(200):
        hits[spatial_sample(pts, 100, seed=seed)] += 1
    assert hits[:900].mean() / 200 == pytest.approx(0.1, abs=0.01)
    assert hits[900:].mean() / 200 == pytest.approx(0.1, abs=0.02)


@pytest.mark.parametrize("n", [-1, 1.5, True, "3"])
def test_sample_rejects_bad_budget(n):
    with pytest.raises(ConfigError, match="max cells"):
        spatial_sample(np.zeros((4, 2)), n)


def test_sample_rejects_bad_points():
    with pytest.raises(ConfigError, match="finite"):
        spatial_sample(np.array([[0.0, np.nan], [1.0, 1.0]]), 1)
    assert spatial_sample(np.zeros((3, 2)), 5).tolist() == [0, 1, 2]
    assert spatial_sample(np.zeros((0, 2)), 5).tolist() == []


def test_balanced_order_prefixes_spread_like_the_area():
    # Points in reading order over an L-shaped zone: every prefix of the order is spread like the
    # area (1/3 per occupied quadrant), where the first k in reading order are the top half.
    rng = np.random.default_rng(4)
    pts = rng.uniform(0, 1000, (6000, 2))
    pts = pts[~((pts[:, 0] >= 500) & (pts[:, 1] >= 500))]
    pts = pts[np.argsort(pts[:, 1])]
    for seed in range(5):
        order = balanced_order(pts, seed)
        assert sorted(order.tolist()) == list(range(len(pts)))
        assert np.array_equal(order, balanced_order(pts, seed))
        for k in (30, 90, 300):
            counts = _quadrant_counts(pts, order[:k], 1000, 1000)
            assert counts[3] == 0 and np.all(np.abs(counts[:3] - k / 3) <= max(3, 0.06 * k)), (
                k,
                counts,
            )
    assert _quadrant_counts(pts, np.arange(90), 1000, 1000)[2] == 0


def test_balanced_order_gives_every_point_the_same_chance_at_any_prefix():
    rng = np.random.default_rng(5)
    pts = np.vstack([rng.uniform(0, 100, (900, 2)), rng.uniform(0, 1000, (100, 2))])
    for k in (37, 100):
        hits = np.zeros(len(pts))
        for seed in range(200):
            hits[balanced_order(pts, seed)[:k]] += 1
        assert hits[:900].mean() / 200 == pytest.approx(k / 1000, rel=0.1)
        assert hits[900:].mean() / 200 == pytest.approx(k / 1000, rel=0.2)
    with pytest.raises(ConfigError, match="finite"):
        balanced_order(np.array([[0.0, np.inf]]))
    with pytest.raises(ConfigError, match="seed"):
        balanced_order(np.zeros((2, 2)), seed=-1)
    assert balanced_order(np.zeros((0, 2))).tolist() == []


# -- region tasks -------------------------------------------------------------------------------
def test_split_regions_bounds_task_area_and_keeps_every_box():
    boxes = [
        (x, y, x + 1024, y + 1024) for y in range(0, 8192, 1024) for x in range(0, 20480, 1024)
    ]
    tasks = split_regions(boxes, max_task_px=16 * 1024 * 1024)
    assert all(t.area_px <= 16 * 1024 * 1024 for t in tasks)
    assert sum(t.area_px for t in tasks) == len(boxes) * 1024 * 1024
    # Runs are at most 8 boxes long.
    assert max(b[2] - b[0] for t in tasks for b in t.boxes) <= 8 * 1024
    assert len(split_regions(boxes, tasks=4)) in (4, 5)


@pytest.mark.parametrize("bad", [["monolayer", "lungs"], [], "reading", [3]])
def test_bad_zone_names_are_one_clear_error(bad):
    with pytest.raises(ConfigError, match="--zones"):
        _check_select(bad)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_cell_budget_is_a_clear_error(tmp_path, bad):
    with pytest.raises(ConfigError, match="max-cells-per-slide"):
        detect_slide(tmp_path / "missing.svs", max_cells=bad)


# -- a small generated smear --------------------------------------------------------------------
@pytest.fixture(scope="module")
def smear(tmp_path_factory):
    return build_whole_smear(
        tmp_path_factory.mktemp("sd"),
        SmearSpec(width_mm=2.0, height_mm=1.0, seed=21, source="pbc", monolayer_fraction=0.3),
    )


@_DATA
def test_zone_path_reads_only_chosen_regions_and_counts_the_rest(smear):
    truth = json.loads(smear.truth_path.read_text())
    with open_slide(smear.path) as inner:
        slide = CountingSlide(inner)
        res = detect_slide(slide, zones=True)
        read = slide.level0_fraction()
        plan = plan_smear(slide)
    info = res.info
    assert set(info["cells_outside_zones"]) == {"glass", "thick", "feathered"}
    assert info["sampled"] is False and info["cells_total"] == len(res.records)
    assert len(res.cell_zones) == len(res.records)
    assert all(z["smear_zone"] == "monolayer" and z["rbc_coverage"] > 0 for z in res.cell_zones)
    assert info["zones"]["areas_mm2"]["monolayer"] > 0
    assert info["zone_map_png"].startswith(b"\x89PNG")
    # Level 0 is touched only inside the plan's boxes (plus the half-overlap margin): well
    # under the whole slide, and no level-0 tile of a glass-only grid cell.
    assert read < 0.85
    inside = set()
    for t in plan.tasks:
        for b in t.boxes:
            for ty in range(max(0, b[1] - 512) // 256, (b[3] + 512) // 256 + 1):
                for tx in range(max(0, b[0] - 512) // 256, (b[2] + 512) // 256 + 1):
                    inside.add((tx, ty))
    assert slide.tiles0 <= inside
    # Every monolayer truth white cell is found (detector recall on the generator's cells).
    mono = [tuple(w["box"]) for w in truth["wbcs"] if w["zone"] == "monolayer"]
    got = match_cells([(r["centroid_x"], r["centroid_y"]) for r in res.records], mono)
    assert len(got) >= 0.9 * len(mono)


@_DATA
def test_region_tasks_in_any_split_give_the_same_cells(smear):
    with open_slide(smear.path) as slide:
        plan = plan_smear(slide)
        whole = merge_regions(plan, [detect_region(slide, t) for t in plan.tasks])
        windows = [g for t in plan.tasks for _, g in _task_windows(t)]
        assert len(windows) > 1
        # One task per detection window, in reverse order: task borders everywhere, each cell
        # still found once and the same (a job may split a plan's tasks any way at windows).
        bp = plan.tasks[0].block_px
        assert plan.candidate_level is not None  # coarse-to-fine (a 0.25/1/4 µm/px pyramid)
        tasks = [
            RegionTask(i, tuple(g), plan.level, plan.mpp, bp, plan.candidate_level)
            for i, g in enumerate(reversed(windows))
        ]
        split = merge_regions(plan, [detect_region(slide, t) for t in tasks])
        assert (
            len(split_regions([b for t in plan.tasks for b in t.boxes], block_px=bp, tasks=3)) >= 2
        )
    key = lambda m: sorted((round(c.centroid[0]), round(c.centroid[1])) for c in m.cells)  # noqa: E731
    a, b = key(whole), key(split)
    assert len(a) == len(b) and a == b
    assert whole.outside == split.outside


@_DATA
def test_budget_reads_fields_until_met_and_estimates_the_total(smear):
    with open_slide(smear.path) as inner:
        slide = CountingSlide(inner)
        full = detect_slide(slide, zones=True)
        full_read = slide.level0_fraction()
        n = full.info["cells_total"]
        slide = CountingSlide(inner)
        part = detect_slide(slide, zones=True, max_cells=max(1, n // 4), seed=5)
        part_read = slide.level0_fraction()
        again = detect_slide(inner, zones=True, max_cells=max(1, n // 4), seed=5)
        every = detect_slide(inner, zones=True, max_cells=10 * n, seed=5)
    info = part.info
    assert info["sampled"] is True and info["cells_total_estimated"] is True
    assert 0 < info["fields_read"] < info["fields_total"]
    assert 0 < info["sampled_area_mm2"] < 0.6 * full.info["zones"]["areas_mm2"]["monolayer"]
    # The estimate scales the fields' cells by area: one draw is rough at a budget of a few
    # cells, its mean over seeds is the count (28 cells: 28.6 mean, sd 8.7 over 30 seeds;
    # without the stopping rule's correction the mean is ~16 % high).
    assert n / 3 <= info["cells_total"] <= 3 * n, (info["cells_total"], n)
    with open_slide(smear.path) as inner:
        plan = plan_smear(inner)
        est = [sample_fields(inner, plan, None, max(1, n // 4), k).cells_total for k in range(16)]
    assert np.mean(est) == pytest.approx(n, rel=0.25), (est, n)
    assert len(part.records) == max(1, n // 4)
    # Level 0 is read in the fields read only.
    assert part_read < 0.6 * full_read, (part_read, full_read)
    pts = [(r["centroid_x"], r["centroid_y"]) for r in part.records]
    assert pts == [(r["centroid_x"], r["centroid_y"]) for r in again.records]
    # Not the first cells in reading order; each one of the full read's cells (a field is
    # detected in a window of its own: on this smear centroids move by under 2 px, up to
    # 9 px on others).
    first = [(r["centroid_x"], r["centroid_y"]) for r in full.records[: len(pts)]]
    assert pts != first
    whole = np.array([(r["centroid_x"], r["centroid_y"]) for r in full.records])
    assert all(np.hypot(*(whole - p).T).min() < 2.0 for p in pts)
    # A budget no field exhausts reads every field: the exact count, not sampled.
    e = every.info
    assert (e["cells_total_estimated"], e["sampled"]) == (False, False)
    assert e["fields_read"] == e["fields_total"] and e["cells_total"] == len(every.records) == n


@_DATA
def test_crops_read_box_by_box_equal_crops_read_after_the_merge(smear):
    # detect_slide reads each window's crops right after detecting it (tiles still cached);
    # the records and crops must be those of detecting everything first and cropping after.
    with open_slide(smear.path) as slide:
        res = detect_slide(slide, zones=True)
        plan = plan_smear(slide)
        merged = merge_regions(plan, [detect_region(slide, t, plan=plan) for t in plan.tasks])
        recs, crops = measure_cells(
            slide, merged.cells, plan.level, plan.mpp, slide.mpp_source, DetectConfig(), slide.path
        )
    assert len(res.records) == len(recs) > 0
    assert [r["qc_flags"] for r in res.records] == [r["qc_flags"] for r in recs]
    assert res.records == [dict(r, source=res.records[0]["source"]) for r in recs]
    assert np.array_equal(res.crops, crops)
    assert res.cell_zones == merged.cell_zones


def test_cells_measured_in_pieces_are_numbered_and_flagged_as_in_one_call(smear):
    # The job crops a budget's sample piece by piece: numbering and the overlap part of
    # ``clumped`` must be over the whole sample, not over each piece.
    from dataclasses import replace

    with open_slide(smear.path) as slide:
        plan = plan_smear(slide)
        merged = merge_regions(plan, [detect_region(slide, t, plan=plan) for t in plan.tasks])
        first = merged.cells[0]
        x0, y0, x1, y1 = first.box
        # a twin overlapping the first cell's box, so the first is clumped only beside it
        twin = replace(first, box=(x0 + 2, y0 + 2, x1 + 2, y1 + 2), clumped=False)
        sample = [replace(first, clumped=False), twin, *merged.cells[1:3]]
        args = (plan.level, plan.mpp, slide.mpp_source, DetectConfig(), slide.path)
        whole, _ = measure_cells(slide, sample, *args)
        pieces = [
            rec
            for k in range(len(sample))
            for rec in measure_cells(slide, sample[k : k + 1], *args, sample=sample, start=k)[0]
        ]
    assert "clumped" in whole[0]["qc_flags"]
    assert pieces == whole


@_DATA
def test_size_guard_counts_the_planned_area_of_a_zoned_read(smear):
    from pipeline.errors import SlideTooLargeError

    with open_slide(smear.path) as slide:
        w, h = slide.dimensions
        plan = plan_smear(slide)
        planned = sum(t.area_px for t in plan.tasks)
        assert planned < 0.8 * w * h
        # A limit under the whole level but over the planned area: the whole-slide read is
        # refused, the zoned one runs (a 5 GP smear's level 0 is over the default limit).
        cfg = DetectConfig(max_detect_pixels=int((planned + w * h) / 2))
        with pytest.raises(SlideTooLargeError, match="detection level 0"):
            detect_slide(slide, cfg)
        assert detect_slide(slide, cfg, zones=True).records
        # Under the planned area: refused with the planned figure named.
        tight = DetectConfig(max_detect_pixels=int(planned * 0.9))
        with pytest.raises(SlideTooLargeError, match="chosen zones cover"):
            detect_slide(slide, tight, zones=True)


@_DATA
def test_detect_slide_reads_regions_of_the_given_size_with_the_same_cells(smear):
    with open_slide(smear.path) as slide:
        one = detect_slide(slide, zones=True)
        planned = sum(t.area_px for t in plan_smear(slide).tasks)
        small = detect_slide(slide, zones=True, max_task_px=max(planned // 4, 1))
    assert one.info["region_tasks"] == 1
    assert small.info["region_tasks"] >= 2
    key = lambda r: (round(r["centroid_x"]), round(r["centroid_y"]))  # noqa: E731
    assert sorted(map(key, small.records)) == sorted(map(key, one.records))


@_DATA
def test_cells_counted_outside_the_zones_are_located(smear):
    # One stage: the region boxes' margins hold cells of other zones, which are counted
    # (coarse-to-fine drops such candidates before verifying them).
    cfg = DetectConfig(candidate_mpp=None)
    with open_slide(smear.path) as slide:
        res = detect_slide(slide, cfg, zones=True)
        plan = plan_smear(slide, cfg)
        merged = merge_regions(plan, [detect_region(slide, t, cfg) for t in plan.tasks])
    for pts, counts in (
        (res.info["cells_outside_points"], res.info["cells_outside_zones"]),
        (merged.outside_points, merged.outside),
    ):
        assert sum(counts.values()) > 0
        assert len(pts) == sum(counts.values())
        assert {z: sum(p[2] == z for p in pts) for z in counts} == counts
        w, h = smear_dims(smear)
        assert all(0 <= x < w and 0 <= y < h for x, y, _ in pts)


def smear_dims(smear):
    with open_slide(smear.path) as slide:
        return slide.dimensions
