"""Caption ⇄ morphometry consistency rules and their per-slide / per-attribute summary."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from pipeline import consistency as C
from pipeline.consistency import check_consistency, comparable_attributes, consistency_summary

pytestmark = pytest.mark.unit


def _row(**kw):
    base = {
        "cell_size": None,
        "nuclear_cytoplasmic_ratio": None,
        "nucleus_shape": None,
        "cell_diameter_um": None,
        "nc_ratio": None,
        "nucleus_lobes": None,
        "nucleus_circularity": None,
    }
    return base | kw


def test_thresholds_are_ordered():
    assert C.CELL_SIZE_BIG_MIN_UM <= C.CELL_SIZE_SPLIT_UM <= C.CELL_SIZE_SMALL_MAX_UM
    assert C.NC_RATIO_HIGH_MIN < C.NC_RATIO_LOW_MAX
    assert all(hi < lo for lo, hi in C.NC_RATIO_BANDS.values())
    assert C.UNSEGMENTED_MAX_LOBES >= 1 and 0 < C.SEGMENTED_ROUND_CIRCULARITY <= 1


def test_nothing_comparable_is_none():
    assert check_consistency({}) == (None, [])
    assert check_consistency(_row(cell_size="big")) == (None, [])  # no measurement
    assert check_consistency(_row(cell_diameter_um=20.0)) == (None, [])  # no claim
    assert check_consistency(_row(cell_size="big", cell_diameter_um=math.nan)) == (None, [])
    assert check_consistency(_row(nucleus_shape="irregular", nucleus_lobes=3)) == (None, [])
    assert check_consistency(_row(nucleus_shape="segmented-bilobed", nucleus_lobes=0)) == (
        None,
        [],
    )  # no nucleus


def test_cell_size():
    big, small = C.CELL_SIZE_BIG_MIN_UM, C.CELL_SIZE_SMALL_MAX_UM
    assert check_consistency(_row(cell_size="big", cell_diameter_um=big + 2)) == (True, [])
    assert check_consistency(_row(cell_size="big", cell_diameter_um=big - 0.5)) == (
        False,
        ["cell_size"],
    )
    assert check_consistency(_row(cell_size="small", cell_diameter_um=small - 2)) == (True, [])
    assert check_consistency(_row(cell_size="small", cell_diameter_um=small + 0.5)) == (
        False,
        ["cell_size"],
    )


def test_nc_ratio_and_lobes_and_order():
    lo, hi = C.NC_RATIO_LOW_MAX, C.NC_RATIO_HIGH_MIN
    row = _row(
        cell_size="small",
        cell_diameter_um=C.CELL_SIZE_SMALL_MAX_UM + 3,
        nuclear_cytoplasmic_ratio="low",
        nc_ratio=lo * 1.5,
        nucleus_shape="segmented-multilobed",
        nucleus_lobes=1,
        nucleus_circularity=0.95,
    )
    assert check_consistency(row) == (
        False,
        ["cell_size", "nuclear_cytoplasmic_ratio", "nucleus_shape"],
    )
    assert check_consistency(_row(nuclear_cytoplasmic_ratio="high", nc_ratio=hi * 0.5)) == (
        False,
        ["nuclear_cytoplasmic_ratio"],
    )
    assert check_consistency(_row(nuclear_cytoplasmic_ratio="high", nc_ratio=hi + 1)) == (True, [])
    assert check_consistency(_row(nucleus_shape="unsegmented-round", nucleus_lobes=1)) == (True, [])
    assert check_consistency(
        _row(nucleus_shape="unsegmented-band", nucleus_lobes=C.UNSEGMENTED_MAX_LOBES + 1)
    ) == (False, ["nucleus_shape"])
    assert check_consistency(_row(nucleus_shape="segmented-bilobed", nucleus_lobes=2)) == (True, [])
    # one lobe: only a round nucleus contradicts "segmented"; without circularity nothing to compare
    round_ = C.SEGMENTED_ROUND_CIRCULARITY
    assert check_consistency(
        _row(nucleus_shape="segmented-bilobed", nucleus_lobes=1, nucleus_circularity=round_ + 0.01)
    ) == (False, ["nucleus_shape"])
    assert check_consistency(
        _row(nucleus_shape="segmented-bilobed", nucleus_lobes=1, nucleus_circularity=round_ - 0.2)
    ) == (True, [])
    assert check_consistency(_row(nucleus_shape="segmented-bilobed", nucleus_lobes=1)) == (None, [])
    assert comparable_attributes(row) == ["cell_size", "nuclear_cytoplasmic_ratio", "nucleus_shape"]


def test_summary_per_slide_and_attribute():
    rows = [
        _row(
            slide_id="a", cell_size="big", cell_diameter_um=C.CELL_SIZE_BIG_MIN_UM - 1
        ),  # bad size
        _row(
            slide_id="a",
            cell_size="big",
            cell_diameter_um=C.CELL_SIZE_BIG_MIN_UM + 3,
            nucleus_shape="segmented-bilobed",
            nucleus_lobes=1,
            nucleus_circularity=0.99,
        ),  # size ok, shape bad
        _row(slide_id="a"),  # nothing comparable
        _row(slide_id="b", nuclear_cytoplasmic_ratio="low", nc_ratio=0.3),  # ok
    ]
    s = consistency_summary(pa.Table.from_pylist(rows))
    per_slide = {r["slide_id"]: r for r in s["per_slide"].to_pylist()}
    assert per_slide["a"] == {
        "slide_id": "a",
        "cells": 3,
        "checked": 2,
        "inconsistent": 2,
        "inconsistent_rate": 1.0,
    }
    assert per_slide["b"]["inconsistent_rate"] == 0.0
    per_attr = {r["attribute"]: r for r in s["per_attribute"].to_pylist()}
    assert (per_attr["cell_size"]["comparable"], per_attr["cell_size"]["inconsistent"]) == (2, 1)
    assert (per_attr["nucleus_shape"]["comparable"], per_attr["nucleus_shape"]["inconsistent"]) == (
        1,
        1,
    )
    assert per_attr["nuclear_cytoplasmic_ratio"]["inconsistent_rate"] == 0.0
    assert consistency_summary(rows)["per_slide"].num_rows == 2  # plain dict rows work too


def test_nc_band_is_per_cell_type_and_never_stretched_for_basophils():
    """The issue's miss: a caption saying "low N:C" for a measured N:C of 2.28 passed, because
    one band had to hold basophils (granules segment as nucleus) and stretched to 5.0."""
    low = {"nuclear_cytoplasmic_ratio": "low", "nc_ratio": 2.28}
    assert check_consistency(_row(cell_type="neutrophil", **low)) == (
        False,
        ["nuclear_cytoplasmic_ratio"],
    )
    assert check_consistency(_row(cell_type="eosinophil", **low)) == (
        False,
        ["nuclear_cytoplasmic_ratio"],
    )
    assert check_consistency(_row(cell_type="monocyte", **low)) == (
        True,
        [],
    )  # monocytes' band is wider
    # a basophil's measured N:C is not compared at all (not "consistent" either)
    assert check_consistency(
        _row(cell_type="basophil", nuclear_cytoplasmic_ratio="low", nc_ratio=5.0)
    ) == (None, [])
    assert (
        comparable_attributes(
            _row(cell_type="Basophil", nuclear_cytoplasmic_ratio="high", nc_ratio=0.1)
        )
        == []
    )
    # no type in the caption: the pooled band, which is tighter than 5
    assert check_consistency(_row(nuclear_cytoplasmic_ratio="low", nc_ratio=4.0)) == (
        False,
        ["nuclear_cytoplasmic_ratio"],
    )
    assert C.NC_RATIO_LOW_MAX < 3.0
