"""Caption datasets: one reader per dataset, and the demo dataset.

Modules: :mod:`~hemblip.datasets.wbcatt` (WBCAtt CSV), :mod:`~hemblip.datasets.leukemia_attri`
(LeukemiaAttri COCO JSON), :mod:`~hemblip.datasets.generic_csv` (any captioned images; also the
written format), :mod:`~hemblip.datasets.bccd`, :mod:`~hemblip.datasets.segmentation_wbc`,
:mod:`~hemblip.datasets.demo` (the demo checkpoint's data: PBC/WBCAtt + BCCD +
segmentation_WBC) and :mod:`~hemblip.datasets.load` (picks the reader by the file). What they
share (sample types, the crop, value normalisation, splits) is in ``_common``.

Every reader returns a :class:`SampleList` (a ``list`` of :class:`CaptionSample`, plus
``.skipped``: the items left out and why). A cell is cut out of its image exactly as the job cuts
it out of a slide (train/serve parity): :func:`hemblip.crops.cell_crop`, a ``crop_um`` (36) µm
square around the cell's centre at the image's own scale, resampled to ``crop_px`` (224) px with
the job's interpolation; what lies past the image border is the image mirrored (a field is cut
out of a smear, so smear surrounds it, not glass). The image's scale (µm/px) is, as in the job,
its TIFF resolution tags when present, else the ``mpp`` given (argument, ``mpp`` column, or a
dataset's documented scale), else the red-cell estimate of the image
(:func:`hemblip.scale.estimate_image_mpp`); each sample records it (``mpp``, ``mpp_source``).
``framing="box"`` keeps the old crop of ``scale`` x the cell box (every cell filling the same
share of its crop: a size cue the job never shows) for comparisons only.

A bad row raises :class:`~hemblip.errors.DatasetError` naming the file and row, unless
``skip_missing=True`` where missing/unreadable images (and images without a usable scale) are
recorded in ``.skipped``.
"""

from __future__ import annotations

from hemblip.datasets._common import (
    FRAMINGS,
    SPLITS,
    CaptionSample,
    SampleList,
    Skipped,
    crop_around_box,
    read_csv_table,
    split_samples,
)
from hemblip.datasets.bccd import BCCD_MPP, read_bccd
from hemblip.datasets.demo import build_demo_dataset
from hemblip.datasets.generic_csv import read_generic_csv, write_generic_csv
from hemblip.datasets.leukemia_attri import read_leukemia_attri
from hemblip.datasets.load import load_dataset
from hemblip.datasets.segmentation_wbc import SEGMENTATION_WBC_MPP, read_segmentation_wbc
from hemblip.datasets.wbcatt import PBC_MPP, read_wbcatt

__all__ = [
    "CaptionSample",
    "SampleList",
    "Skipped",
    "crop_around_box",
    "read_wbcatt",
    "read_leukemia_attri",
    "read_generic_csv",
    "write_generic_csv",
    "read_bccd",
    "read_segmentation_wbc",
    "load_dataset",
    "build_demo_dataset",
    "split_samples",
    "read_csv_table",
    "SPLITS",
    "FRAMINGS",
    "SEGMENTATION_WBC_MPP",
    "PBC_MPP",
    "BCCD_MPP",
]
