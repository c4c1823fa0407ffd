"""``python -m pipeline eval-smear`` (pipeline.eval_smear): matching, scoring, bad arguments."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import ConfigError
from pipeline.eval_smear import (
    count_duplicates,
    evaluate_smears,
    format_table,
    match_cells,
    truth_zone,
)
from pipeline.whole_smear import DEFAULT_DATA_DIR, SmearSpec

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::FutureWarning")]


def test_match_is_one_to_one_centroid_in_box():
    boxes = [(0, 0, 10, 10), (20, 0, 30, 10)]
    # Two predictions in the first box: one match, the other is a false positive.
    pairs = match_cells([(5, 5), (6, 6), (25, 5), (50, 50)], boxes)
    assert sorted(pairs) == [(0, 0), (2, 1)]
    assert match_cells([(10, 5)], boxes) == []  # x1 is exclusive


def test_a_cell_reported_twice_is_counted_as_a_duplicate():
    boxes = [(0, 0, 10, 10), (20, 0, 30, 10)]
    pred = [(5, 5), (6, 6), (25, 5), (50, 50), (21, 1)]
    pairs = match_cells(pred, boxes)
    # (6, 6) and (21, 1) repeat matched cells; (50, 50) is a false positive, not a duplicate
    assert count_duplicates(pred, boxes, pairs) == 2
    # a detection in an unmatched box is a match, not a duplicate
    assert count_duplicates([(5, 5)], boxes, match_cells([(5, 5)], boxes)) == 0
    assert count_duplicates([], boxes, []) == 0


def test_truth_zone_is_the_ring_rule_where_the_truth_has_it():
    # A cell centred in the monolayer whose 60 µm ring is mostly glass (the smear's corner) is a
    # glass cell by the pipeline's rule: not described by design, not a miss.
    assert truth_zone({"zone": "monolayer", "ring_zone": "glass"}) == "glass"
    assert truth_zone({"zone": "monolayer"}) == "monolayer"  # truth written before ring_zone


@pytest.mark.parametrize("bad", [("monolayer", "x"), ()])
def test_bad_zones_fail_once_before_any_slide_is_built(bad, tmp_path):
    with pytest.raises(ConfigError, match="--zones"):
        evaluate_smears([SmearSpec(width_mm=1.0, height_mm=0.5)], select=bad, out_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_bad_budget_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="max-cells-per-slide"):
        evaluate_smears([], max_cells=0, out_dir=tmp_path)


def test_unbuildable_slide_is_recorded_and_the_rest_goes_on(tmp_path):
    res = evaluate_smears(
        [SmearSpec(width_mm=1.0, height_mm=0.5)], out_dir=tmp_path / "o", data_dir=tmp_path
    )
    assert res["slides"] == [] and len(res["errors"]) == 1
    assert "not found" in res["errors"][0]["error"]
    assert "detection" in format_table(res)


@pytest.mark.skipif(not (DEFAULT_DATA_DIR / "txl_pbc").is_dir(), reason="shared data not present")
def test_small_smear_is_scored(tmp_path):
    spec = SmearSpec(width_mm=2.0, height_mm=1.0, seed=31, source="pbc", monolayer_fraction=0.3)
    res = evaluate_smears([spec], out_dir=tmp_path)
    assert res["errors"] == []
    row = res["slides"][0]
    assert row["truth_wbc_chosen_zones"] > 0 and 0 <= row["recall"] <= 1
    assert row["zone_agreement"]["overall"] > 0.8
    assert 0 < row["level0_fraction_read"] < 1
    assert set(row["cells_outside_zones"]) == {"glass", "thick", "feathered"}
    assert "recall" in format_table(res)
    # Both counts of the truth: by the ring rule (scored) and by the box centre (reported).
    truth = json.loads((tmp_path / "smear_pbc_31.truth.json").read_text())
    assert row["truth_wbc_chosen_zones"] == sum(
        c["ring_zone"] == "monolayer" for c in truth["wbcs"]
    )
    assert row["truth_wbc_centre_in_zones"] == sum(c["zone"] == "monolayer" for c in truth["wbcs"])
    assert 0 <= row["recall_centre_rule"] <= 1


@pytest.mark.unit
def test_more_slides_per_source_have_their_own_seeds():
    from pipeline.eval_smear import default_specs

    one = default_specs()
    three = default_specs(per_source=3)
    assert len(three) == 3 * len(one)
    assert len({(s.source, s.seed) for s in three}) == len(three)
    assert {s.source for s in three} == {s.source for s in one}
    assert three[: len(one)] == one  # the first slide of each source is today's


@pytest.mark.unit
@pytest.mark.parametrize("bad", [0, 21, True, 1.5, "2"])
def test_bad_per_source_is_a_clear_error(bad):
    from pipeline.errors import ConfigError
    from pipeline.eval_smear import default_specs

    with pytest.raises(ConfigError, match=r"^--per-source must be an integer"):
        default_specs(per_source=bad)
