"""Attacks on :func:`pipeline.eval_slides.score_field` / :func:`duplicate_groups` (edge-cut cells,
cells labelled twice): invariants on random fields, order independence, degenerate and non-finite
input, and size."""

from __future__ import annotations

import math
import random
import time

import pytest

from pipeline.eval_slides import DUPLICATE_IOU, duplicate_groups, score_field

COUNTS = ("tp", "fp", "fn", "outside", "in_edge_cell", "edge_boxes", "duplicate_boxes")


def _iou(a, b) -> float:
    """Reference intersection over union of two boxes (one pair, plain Python)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _counts(sc) -> tuple[int, ...]:
    return tuple(getattr(sc, k) for k in COUNTS)


def _components(boxes, iou=DUPLICATE_IOU) -> list[int]:
    """Reference: each box -> the smallest index of its connected component (IoU >= iou)."""
    n = len(boxes)
    out = [-1] * n
    for s in range(n):
        if out[s] >= 0:
            continue
        comp, todo = {s}, [s]
        while todo:
            j = todo.pop()
            for k in range(n):
                if k not in comp and _iou(boxes[j], boxes[k]) >= iou:
                    comp.add(k)
                    todo.append(k)
        for j in comp:
            out[j] = min(comp)
    return out


def _near(b, w, h, e) -> bool:
    return b[0] <= e or b[1] <= e or b[2] >= w - e or b[3] >= h - e


def _grid_field(rng: random.Random):
    """Boxes on a 10 px grid, detections on a 5 px grid: many exactly equal distances."""
    boxes = []
    for _ in range(rng.randint(1, 8)):
        x0, y0 = 10.0 * rng.randint(0, 8), 10.0 * rng.randint(0, 8)
        boxes.append((x0, y0, x0 + 10.0 * rng.randint(1, 3), y0 + 10.0 * rng.randint(1, 3)))
    pts = [(5.0 * rng.randint(0, 20), 5.0 * rng.randint(0, 20)) for _ in range(rng.randint(1, 10))]
    return pts, boxes, 100, 100, rng.choice([0.0, 2.0])


def _random_field(rng: random.Random, integer: bool = False):
    w, h = rng.choice([(100, 100), (160, 120), (640, 480)])

    def num(a: float, b: float) -> float:
        a, b = min(a, b), max(a, b)
        if integer and math.ceil(a) <= math.floor(b):
            return float(rng.randint(math.ceil(a), math.floor(b)))
        return rng.uniform(a, b)

    boxes = []
    for _ in range(rng.randint(0, 12)):
        x0, y0 = num(-10, w - 5), num(-10, h - 5)
        b = (x0, y0, x0 + num(1, 60), y0 + num(1, 60))
        boxes.append(b)
        if boxes and rng.random() < 0.3:  # a second label of the same cell
            d = num(-3, 3)
            boxes.append((b[0] + d, b[1] - d, b[2] + d, b[3]))
    pts = []
    for _ in range(rng.randint(0, 15)):
        if boxes and rng.random() < 0.6:
            b = rng.choice(boxes)
            pts.append((num(b[0], b[2]), num(b[1], b[3])))
        else:
            pts.append((num(-15, w + 15), num(-15, h + 15)))
    edge = rng.choice([0.0, 1.0, 2.0, 11.76, 30.0])
    return pts, boxes, w, h, edge


def _check_invariants(pts, boxes, w, h, edge, dedupe=DUPLICATE_IOU):
    sc = score_field(pts, boxes, w, h, edge_px=edge, dedupe_iou=dedupe)
    group = _components(boxes, dedupe) if dedupe is not None else list(range(len(boxes)))
    cells = set(group)
    edge_cells = {
        c for c in cells if any(_near(b, w, h, edge) for b, g in zip(boxes, group) if g == c)
    }
    inside = [i for i, (x, y) in enumerate(pts) if 0 <= x < w and 0 <= y < h]
    assert sc.outside == len(pts) - len(inside)
    assert sc.duplicate_boxes == len(boxes) - len(cells)
    assert sc.edge_boxes == len(edge_cells)
    assert sc.tp + sc.fn == len(cells) - len(edge_cells)
    assert sc.tp + sc.fp + sc.in_edge_cell == len(inside)
    assert sc.tp + sc.fp + sc.in_edge_cell + sc.outside == len(pts)
    assert min(_counts(sc)) >= 0
    assert sc.tp == len(sc.matches)
    det = [i for i, _c in sc.matches]
    hit = [c for _i, c in sc.matches]
    assert len(set(det)) == len(det) and len(set(hit)) == len(hit)  # one-to-one
    for i, c in sc.matches:
        assert i in inside
        assert c == group[c] and c not in edge_cells  # names the cell's first box; required
        x, y = pts[i]
        assert any(
            g == c and b[0] <= x < b[2] and b[1] <= y < b[3] for b, g in zip(boxes, group)
        )  # a TP lies in a box of its cell
    return sc


@pytest.mark.unit
def test_random_fields_every_point_and_cell_is_counted_exactly_once():
    rng = random.Random(16)
    for n in range(900):
        pts, boxes, w, h, edge = (
            _grid_field(rng) if n % 3 == 0 else _random_field(rng, integer=rng.random() < 0.5)
        )
        _check_invariants(pts, boxes, w, h, edge)
        _check_invariants(pts, boxes, w, h, edge, dedupe=None)


@pytest.mark.unit
def test_duplicate_groups_is_the_connected_components_of_the_overlap_graph():
    rng = random.Random(1616)
    for _ in range(300):
        _pts, boxes, *_ = _random_field(rng, integer=rng.random() < 0.5)
        iou = rng.choice([DUPLICATE_IOU, 0.1, 0.9])
        g = duplicate_groups(boxes, iou)
        assert g == _components(boxes, iou)
        # permuting the boxes permutes the partition, nothing else
        perm = list(range(len(boxes)))
        rng.shuffle(perm)
        gp = duplicate_groups([boxes[p] for p in perm], iou)
        part = {frozenset(j for j in range(len(g)) if g[j] == c) for c in set(g)}
        part_p = {frozenset(perm[j] for j in range(len(gp)) if gp[j] == c) for c in set(gp)}
        assert part == part_p


@pytest.mark.unit
def test_long_overlap_chain_is_one_cell():
    chain = [(float(i), 0.0, i + 10.0, 10.0) for i in range(300)]  # neighbours IoU 0.82
    assert duplicate_groups(chain) == [0] * 300
    assert duplicate_groups(chain[::-1]) == [0] * 300
    sc = score_field([], chain, 1000, 100, edge_px=0.0)
    assert (sc.fn, sc.edge_boxes, sc.duplicate_boxes) == (0, 1, 299)  # box 0 touches x = 0


@pytest.mark.unit
def test_counts_do_not_depend_on_the_order_of_boxes_or_detections():
    rng = random.Random(61)
    for n in range(1200):
        # integer and grid coordinates: distance ties
        pts, boxes, w, h, edge = _random_field(rng, integer=True) if n % 2 else _grid_field(rng)
        ref = _counts(score_field(pts, boxes, w, h, edge_px=edge))
        for _k in range(3):
            p2, b2 = pts[:], boxes[:]
            rng.shuffle(p2)
            rng.shuffle(b2)
            assert _counts(score_field(p2, b2, w, h, edge_px=edge)) == ref, (pts, boxes, w, h, edge)


@pytest.mark.unit
def test_equal_distance_tie_does_not_make_the_result_depend_on_box_order():
    # the detection at (15, 10) is 5 px from both centres; the one at (28, 10) lies only in the
    # right box. Whichever box is listed first, both cells are found.
    left, right = (0.0, 0.0, 20.0, 20.0), (10.0, 0.0, 30.0, 20.0)  # IoU 1/3: two cells
    pts = [(15.0, 10.0), (28.0, 10.0)]  # (shifted 40 px into the field, off its edges)
    for boxes in ([left, right], [right, left]):
        shifted = [(b[0] + 40, b[1] + 40, b[2] + 40, b[3] + 40) for b in boxes]
        pp = [(x + 40, y + 40) for x, y in pts]
        sc = score_field(pp, shifted, 100, 100, edge_px=0.0)
        assert (sc.tp, sc.fp, sc.fn) == (2, 0, 0), boxes
        for p in (pp, pp[::-1]):
            assert (score_field(p, shifted, 100, 100).tp) == 2


@pytest.mark.unit
def test_cell_labelled_many_times_gives_at_most_one_true_positive():
    rng = random.Random(7)
    base = (200.0, 150.0, 260.0, 210.0)
    for _ in range(100):
        boxes = [tuple(v + rng.uniform(-4, 4) for v in base) for _ in range(rng.randint(2, 8))]
        assert len(set(duplicate_groups(boxes))) == 1
        pts = [(rng.uniform(205, 255), rng.uniform(155, 205)) for _ in range(rng.randint(1, 6))]
        sc = score_field(pts, boxes, 640, 480, edge_px=12)
        assert (sc.tp, sc.fp, sc.fn) == (1, len(pts) - 1, 0)
        assert sc.duplicate_boxes == len(boxes) - 1 and sc.matches[0][1] == 0


@pytest.mark.unit
def test_detection_goes_to_the_nearest_labelled_centre_even_next_to_an_edge_cell():
    # An edge cell (x0 = 5 within edge_px = 12 of the left edge) overlapping an inner cell
    # (IoU 0.19: two cells). The detection at (14, 133) is 17.0 px from the edge box's centre
    # (25, 120) and 15.7 px from the inner box's centre (26.5, 142.5): it is the inner cell's.
    # (The edge box's reach, stretched to the edge, has its centre at (22, 120): 15.3 px.)
    edge_box, inner = (5.0, 100.0, 45.0, 140.0), (13.0, 125.0, 40.0, 160.0)
    for boxes in ([edge_box, inner], [inner, edge_box]):
        sc = score_field([(14.0, 133.0)], boxes, 640, 480, edge_px=12)
        assert (sc.tp, sc.fp, sc.fn, sc.in_edge_cell, sc.edge_boxes) == (1, 0, 0, 0, 1)
    # the doubled cell's centroid in the strip between the edge box and the edge is still the
    # edge cell's (not scored)
    sc = score_field([(2.0, 120.0)], [edge_box, inner], 640, 480, edge_px=12)
    assert (sc.tp, sc.fp, sc.fn, sc.in_edge_cell) == (0, 0, 1, 1)


@pytest.mark.unit
def test_empty_inputs():
    assert _counts(score_field([], [], 100, 100)) == (0,) * 7
    assert _counts(score_field([], [], 0, 0)) == (0,) * 7
    sc = score_field([(1, 1), (50, 50)], [], 100, 100)
    assert (sc.fp, sc.outside, sc.matches) == (2, 0, [])
    assert score_field([], [(40, 40, 60, 60)], 100, 100).fn == 1
    assert score_field([(5, 5)], [(40, 40, 60, 60)], 0, 0).outside == 1  # empty field


@pytest.mark.unit
def test_field_bounds_are_half_open():
    pts = [(0.0, 0.0), (99.999, 99.999), (100.0, 50.0), (50.0, 100.0), (-1e-9, 50.0)]
    sc = score_field(pts, [], 100, 100)
    assert (sc.fp, sc.outside) == (2, 3)


@pytest.mark.unit
def test_edge_px_zero_only_boxes_touching_or_crossing_the_edge_are_cut():
    w = h = 100
    touching = [(0, 40, 10, 50), (40, 0, 50, 10), (90, 40, 100, 50), (40, 90, 50, 100)]
    crossing = [(-5, 40, 5, 50), (95, 95, 105, 105)]
    near = [(0.5, 60, 10, 70), (40, 40, 99.5, 50)]
    sc = score_field([], touching + crossing + near, w, h, edge_px=0.0)
    assert (sc.edge_boxes, sc.fn) == (6, 2)
    # a box wholly in the padding or larger than the field is cut as well, never required
    sc = score_field([(50, 50)], [(150, 150, 200, 200), (-10, -10, 110, 110)], w, h, edge_px=0)
    assert (sc.tp, sc.fp, sc.fn, sc.edge_boxes, sc.in_edge_cell) == (0, 0, 0, 2, 1)


@pytest.mark.unit
def test_dedupe_none_keeps_every_box_its_own_cell():
    boxes = [(40, 40, 60, 60)] * 3
    sc = score_field([(50, 50)], boxes, 100, 100, dedupe_iou=None)
    assert (sc.tp, sc.fp, sc.fn, sc.duplicate_boxes) == (1, 0, 2, 0)
    sc = score_field([(50, 50)], boxes, 100, 100)
    assert (sc.tp, sc.fp, sc.fn, sc.duplicate_boxes) == (1, 0, 0, 2)


@pytest.mark.unit
def test_degenerate_boxes_take_no_detection_and_do_not_crash():
    w = h = 100
    zero = (40.0, 40.0, 40.0, 60.0)
    flat = (30.0, 50.0, 70.0, 50.0)
    inverted = (60.0, 60.0, 40.0, 40.0)
    real = (45.0, 45.0, 55.0, 55.0)
    pts = [(40.0, 50.0), (50.0, 50.0), (50.0, 45.0)]
    for boxes in ([zero, flat, inverted, real], [inverted, real, flat, zero]):
        sc = _check_invariants(pts, boxes, w, h, 2.0)
        assert sc.tp == 1 and sc.fp == 2  # only the real box is found
        assert all(boxes[c] == real for _i, c in sc.matches)
    assert duplicate_groups([zero, zero, inverted, inverted]) == [0, 1, 2, 3]


@pytest.mark.unit
def test_negative_coordinates_and_boxes_partly_outside():
    # a field-sized shift of everything out of the field: all cut, all detections outside
    boxes = [(-60, -60, -40, -40), (-30, 20, 10, 40)]
    sc = _check_invariants([(-50, -50), (0, 30), (-10, 30)], boxes, 100, 100, 2.0)
    assert (sc.tp, sc.fn, sc.edge_boxes, sc.outside, sc.in_edge_cell) == (0, 0, 2, 2, 1)


@pytest.mark.unit
def test_non_finite_centroids_are_never_scored_as_hits():
    boxes = [(40.0, 40.0, 60.0, 60.0)]
    nan, inf = float("nan"), float("inf")
    bad = [(nan, 50.0), (50.0, nan), (nan, nan), (inf, 50.0), (-inf, 50.0), (50.0, inf)]
    sc = score_field(bad, boxes, 100, 100)
    assert (sc.tp, sc.fp, sc.fn, sc.outside, sc.matches) == (0, 0, 1, len(bad), [])
    sc = score_field([*bad, (50.0, 50.0)], boxes, 100, 100)
    assert (sc.tp, sc.fn, sc.matches) == (1, 0, [(len(bad), 0)])
    # an infinite field does not turn infinite centroids into hits either
    sc = score_field([(inf, 50.0)], boxes, inf, 100)
    assert sc.tp == 0


@pytest.mark.unit
def test_non_finite_boxes_do_not_crash_or_take_detections():
    nan, inf = float("nan"), float("inf")
    real = (40.0, 40.0, 60.0, 60.0)
    weird = [
        (nan, 40.0, 60.0, 60.0),
        (40.0, 40.0, nan, 60.0),
        (nan, nan, nan, nan),
        (-inf, 40.0, inf, 60.0),
        (0.0, 0.0, inf, inf),
    ]
    for boxes in ([real, *weird], [*weird, real], [real, real, *weird]):
        g = duplicate_groups(boxes)
        assert all(g[j] == j for j, b in enumerate(boxes) if any(math.isnan(v) for v in b))
        sc = score_field([(50.0, 50.0), (10.0, 10.0)], boxes, 100, 100)
        assert sc.tp == 1 and all(boxes[c] == real for _i, c in sc.matches)
        assert sc.tp + sc.fp + sc.in_edge_cell + sc.outside == 2


def _timed(fn, *args, **kw) -> float:
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


@pytest.mark.unit
def test_two_thousand_boxes_score_quickly():
    rng = random.Random(2000)
    w = h = 4096
    boxes = []
    for _ in range(2000):
        x, y, s = rng.uniform(0, w - 40), rng.uniform(0, h - 40), rng.uniform(10, 40)
        boxes.append((x, y, x + s, y + s))
    pts = [(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(2000)]
    assert _timed(score_field, pts, boxes, w, h) < 1.0
    # all one cell labelled 2,000 times, 2,000 detections in it: the worst case for pairs
    same = [(10.0, 10.0, 50.0, 50.0)] * 2000
    assert _timed(score_field, [(30.0, 30.0)] * 2000, same, 100, 100) < 1.0
    chain = [(i * 0.5, 0.0, i * 0.5 + 10.0, 10.0) for i in range(2000)]
    assert _timed(duplicate_groups, chain) < 1.0
