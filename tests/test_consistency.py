"""Caption ⇄ morphometry consistency rules and their per-slide / per-attribute summary."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from pipeline import consistency as C
from pipeline.consistency import check_consistency, comparable_attributes, consistency_summary

pytestmark = pytest.mark.unit


def _row(**kw):
    base = {"cell_size": None, "nuclear_cytoplasmic_ratio": None, "nucleus_shape": None,
            "cell_diameter_um": None, "nc_ratio": None, "nucleus_lobes": None, "nucleus_circularity": None}
    return base | kw


def test_thresholds_are_ordered():
    assert C.CELL_SIZE_BIG_MIN_UM <= C.CELL_SIZE_SPLIT_UM <= C.CELL_SIZE_SMALL_MAX_UM
    assert C.NC_RATIO_HIGH_MIN <= C.NC_RATIO_SPLIT <= C.NC_RATIO_LOW_MAX
    assert C.UNSEGMENTED_MAX_LOBES >= 1 and 0 < C.SEGMENTED_ROUND_CIRCULARITY <= 1


def test_nothing_comparable_is_none():
    assert check_consistency({}) == (None, [])
    assert check_consistency(_row(cell_size="big")) == (None, [])  # no measurement
    assert check_consistency(_row(cell_diameter_um=20.0)) == (None, [])  # no claim
    assert check_consistency(_row(cell_size="big", cell_diameter_um=math.nan)) == (None, [])
    assert check_consistency(_row(nucleus_shape="irregular", nucleus_lobes=3)) == (None, [])
    assert check_consistency(_row(nucleus_shape="segmented-bilobed", nucleus_lobes=0)) == (None, [])  # no nucleus


def test_cell_size():
    big, small = C.CELL_SIZE_BIG_MIN_UM, C.CELL_SIZE_SMALL_MAX_UM
    assert check_consistency(_row(cell_size="big", cell_diameter_um=big + 2)) == (True, [])
    assert check_consistency(_row(cell_size="big", cell_diameter_um=big - 0.5)) == (False, ["cell_size"])
    assert check_consistency(_row(cell_size="small", cell_diameter_um=small - 2)) == (True, [])
    assert check_consistency(_row(cell_size="small", cell_diameter_um=small + 0.5)) == (False, ["cell_size"])


def test_nc_ratio_and_lobes_and_order():
    lo, hi = C.NC_RATIO_LOW_MAX, C.NC_RATIO_HIGH_MIN
    row = _row(cell_size="small", cell_diameter_um=C.CELL_SIZE_SMALL_MAX_UM + 3,
               nuclear_cytoplasmic_ratio="low", nc_ratio=lo * 1.5,
               nucleus_shape="segmented-multilobed", nucleus_lobes=1, nucleus_circularity=0.95)
    assert check_consistency(row) == (False, ["cell_size", "nuclear_cytoplasmic_ratio", "nucleus_shape"])
    assert check_consistency(_row(nuclear_cytoplasmic_ratio="high", nc_ratio=hi * 0.5)) == (False, ["nuclear_cytoplasmic_ratio"])
    assert check_consistency(_row(nuclear_cytoplasmic_ratio="high", nc_ratio=hi + 1)) == (True, [])
    assert check_consistency(_row(nucleus_shape="unsegmented-round", nucleus_lobes=1)) == (True, [])
    assert check_consistency(_row(nucleus_shape="unsegmented-band", nucleus_lobes=C.UNSEGMENTED_MAX_LOBES + 1)) == (False, ["nucleus_shape"])
    assert check_consistency(_row(nucleus_shape="segmented-bilobed", nucleus_lobes=2)) == (True, [])
    # one lobe: only a round nucleus contradicts "segmented"; without circularity nothing to compare
    round_ = C.SEGMENTED_ROUND_CIRCULARITY
    assert check_consistency(_row(nucleus_shape="segmented-bilobed", nucleus_lobes=1,
                                  nucleus_circularity=round_ + 0.01)) == (False, ["nucleus_shape"])
    assert check_consistency(_row(nucleus_shape="segmented-bilobed", nucleus_lobes=1,
                                  nucleus_circularity=round_ - 0.2)) == (True, [])
    assert check_consistency(_row(nucleus_shape="segmented-bilobed", nucleus_lobes=1)) == (None, [])
    assert comparable_attributes(row) == ["cell_size", "nuclear_cytoplasmic_ratio", "nucleus_shape"]


def test_summary_per_slide_and_attribute():
    rows = [
        _row(slide_id="a", cell_size="big", cell_diameter_um=C.CELL_SIZE_BIG_MIN_UM - 1),  # bad size
        _row(slide_id="a", cell_size="big", cell_diameter_um=C.CELL_SIZE_BIG_MIN_UM + 3,
             nucleus_shape="segmented-bilobed", nucleus_lobes=1, nucleus_circularity=0.99),  # size ok, shape bad
        _row(slide_id="a"),  # nothing comparable
        _row(slide_id="b", nuclear_cytoplasmic_ratio="low", nc_ratio=0.3),  # ok
    ]
    s = consistency_summary(pa.Table.from_pylist(rows))
    per_slide = {r["slide_id"]: r for r in s["per_slide"].to_pylist()}
    assert per_slide["a"] == {"slide_id": "a", "cells": 3, "checked": 2, "inconsistent": 2, "inconsistent_rate": 1.0}
    assert per_slide["b"]["inconsistent_rate"] == 0.0
    per_attr = {r["attribute"]: r for r in s["per_attribute"].to_pylist()}
    assert (per_attr["cell_size"]["comparable"], per_attr["cell_size"]["inconsistent"]) == (2, 1)
    assert (per_attr["nucleus_shape"]["comparable"], per_attr["nucleus_shape"]["inconsistent"]) == (1, 1)
    assert per_attr["nuclear_cytoplasmic_ratio"]["inconsistent_rate"] == 0.0
    assert consistency_summary(rows)["per_slide"].num_rows == 2  # plain dict rows work too
