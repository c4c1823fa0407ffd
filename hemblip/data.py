"""Compatibility module: the caption dataset readers live in :mod:`hemblip.datasets` (one module
per dataset). Every public name of the former ``hemblip.data`` is re-exported here unchanged."""

from __future__ import annotations

from hemblip.datasets import (
    BCCD_MPP,
    FRAMINGS,
    PBC_MPP,
    SEGMENTATION_WBC_MPP,
    SPLITS,
    CaptionSample,
    SampleList,
    Skipped,
    build_demo_dataset,
    crop_around_box,
    load_dataset,
    read_generic_csv,
    read_leukemia_attri,
    read_wbcatt,
    split_samples,
    write_generic_csv,
)

__all__ = [
    "CaptionSample",
    "SampleList",
    "Skipped",
    "crop_around_box",
    "read_wbcatt",
    "read_leukemia_attri",
    "read_generic_csv",
    "write_generic_csv",
    "load_dataset",
    "build_demo_dataset",
    "split_samples",
    "SPLITS",
    "FRAMINGS",
    "SEGMENTATION_WBC_MPP",
    "PBC_MPP",
    "BCCD_MPP",
]
