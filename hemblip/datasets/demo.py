"""The demo checkpoint's training data: WBCAtt's PBC cells, BCCD and segmentation_WBC together."""

from __future__ import annotations

from pathlib import Path

from hemblip.crops import CROP_PX, CROP_UM
from hemblip.datasets._common import CaptionSample, SampleList, Skipped
from hemblip.datasets.bccd import read_bccd
from hemblip.datasets.segmentation_wbc import read_segmentation_wbc
from hemblip.datasets.wbcatt import read_wbcatt
from hemblip.errors import DatasetError

__all__ = ["build_demo_dataset"]


def build_demo_dataset(
    shared_data_dir: str | Path,
    *,
    crop_px: int | None = CROP_PX,
    scale: float = 2.5,
    framing: str = "physical",
    crop_um: float = CROP_UM,
    pad: str = "reflect",
) -> SampleList:
    """The demo checkpoint's training data from the shared data folder.

    * ``txl_pbc/pbc_wbcatt.csv``: 450 PBC cells, full healthy captions, split = WBCAtt's own
      (``wbcatt_split``); cropped around the WBC box's centre (for the 23 rows without a single
      box in the CSV, the TXL YOLO WBC box nearest the image centre); scale: :data:`PBC_MPP`
      (one instrument, one scale, as the job reads one scale per slide).
    * ``bccd``: images with exactly one typed WBC (one type in ``wbc_types.csv`` and one WBC box in
      the VOC XML) -> cell-type captions; others are recorded in ``.skipped``. Scale:
      :data:`BCCD_MPP`.
    * ``segmentation_wbc``: every labelled crop, cropped around its cell mask's centroid ->
      cell-type captions. Scale: :data:`SEGMENTATION_WBC_MPP` (measured once per part).

    Every crop is the job's (see :mod:`hemblip.datasets`): ``crop_um`` µm, ``crop_px`` px (default 224),
    mirrored past the image border; ``framing="box"`` gives the old ``scale`` x box crops. Only
    the PBC cells carry a split; use :func:`split_samples` for the rest.
    """
    root = Path(shared_data_dir)
    pbc_csv = root / "txl_pbc" / "pbc_wbcatt.csv"
    if not pbc_csv.is_file():
        raise DatasetError(f"{pbc_csv}: not found; is {root} the shared data folder?")
    pbc = read_wbcatt(
        pbc_csv,
        root / "txl_pbc",
        crop_px=crop_px,
        scale=scale,
        framing=framing,
        crop_um=crop_um,
        pad=pad,
    )
    for s in pbc:
        s.source = "pbc_wbcatt"
    skipped: list[Skipped] = list(pbc.skipped)
    samples: list[CaptionSample] = list(pbc)
    cut = {"crop_px": crop_px, "scale": scale, "framing": framing, "crop_um": crop_um, "pad": pad}
    for folder, reader in (("bccd", read_bccd), ("segmentation_wbc", read_segmentation_wbc)):
        if (root / folder).is_dir():
            part = reader(root / folder, **cut)
            samples += part
            skipped += part.skipped
    return SampleList(samples, skipped)
