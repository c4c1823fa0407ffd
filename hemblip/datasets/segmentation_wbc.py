"""segmentation_WBC: single-cell crops with a cell mask and a class label, in parts (dataset1, 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hemblip.captions import render_caption
from hemblip.crops import CROP_UM
from hemblip.datasets._common import (
    CaptionSample,
    SampleList,
    Skipped,
    _finish,
    _Framing,
    _load_image,
    _load_image_mpp,
    read_csv_table,
)
from hemblip.errors import DatasetError

__all__ = ["SEGMENTATION_WBC_MPP", "read_segmentation_wbc"]

#: µm/px of the segmentation_WBC crops, measured once over the whole dataset (their red-cell
#: estimates per crop are unusable: dataset1's 120-px crops hold one or two red cells, and a few
#: of dataset2's are off by 4x). dataset2 (300 px, CellaVision): the median of the red-cell
#: estimates of its 100 crops (0.115; IQR 0.105-0.137). dataset1 (120 px): too few red cells
#: for any estimate (median 0.69, IQR 0.42-1.21: noise); its white cells' mask diameters, class
#: by class, are 2.09-2.48x smaller in px than dataset2's (neutrophils 76.5 vs 160.1 px,
#: lymphocytes 58.2 vs 140.2), so 0.115 x ~2.2 = 0.25.
SEGMENTATION_WBC_MPP = {"dataset1": 0.25, "dataset2": 0.115}
_SEG_LABELS = {
    "1": "neutrophil",
    "2": "lymphocyte",
    "3": "monocyte",
    "4": "eosinophil",
    "5": "basophil",
}


def read_segmentation_wbc(
    root: str | Path,
    *,
    crop_px: int | None = None,
    scale: float = 2.5,
    mpp: float | None = None,
    framing: str = "physical",
    crop_um: float = CROP_UM,
    pad: str = "reflect",
) -> SampleList:
    """Read the segmentation_WBC folder ``root``: every part (a subfolder with ``labels.csv``).

    One sample per labelled crop with a cell-type caption, cut as the job cuts a cell (see
    :mod:`hemblip.datasets`) around its cell mask's centroid (no mask: the crop's centre).
    Scale: TIFF tags, else ``mpp`` (µm/px), else the part's :data:`SEGMENTATION_WBC_MPP`; rows
    with an unknown label or no scale are recorded in ``.skipped`` with their reason.
    """
    skipped: list[Skipped] = []
    samples = _read(Path(root), _Framing(framing, crop_um, crop_px, pad, scale, mpp), skipped)
    return SampleList(samples, skipped)


def _read(root: Path, fr: _Framing, skipped: list[Skipped]) -> list[CaptionSample]:
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and (p / "labels.csv").is_file()):
        _header, rows = read_csv_table(sub / "labels.csv")
        for i, row in enumerate(rows, start=2):
            values = list(row.values())
            image_id, label = str(values[0]).strip(), str(values[1]).strip()
            item = f"{sub / 'labels.csv'}:{i}"
            if label not in _SEG_LABELS:
                skipped.append(Skipped(item, f"unknown class label {label!r}"))
                continue
            img_path = sub / f"{int(image_id):03d}.png"
            mask_path = sub / f"{int(image_id):03d}_mask.png"
            try:
                image, meta = _load_image_mpp(img_path)
            except DatasetError as exc:
                skipped.append(Skipped(item, str(exc)))
                continue
            box, center = None, None
            if mask_path.is_file():
                mask = _load_image(mask_path)[:, :, 0] > 0
                ys, xs = np.nonzero(mask)
                if len(xs):
                    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
                    # the cell mask's centroid: where the job's detector puts a cell's centre
                    center = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
            if center is None:  # a single-cell crop: the cell is in the middle
                center = (image.shape[1] / 2, image.shape[0] / 2)
            sc = None
            if fr.physical:
                if meta is not None:
                    sc = (meta, "metadata")
                elif fr.mpp is not None:
                    sc = (fr.mpp, "given")
                elif sub.name in SEGMENTATION_WBC_MPP:
                    sc = (SEGMENTATION_WBC_MPP[sub.name], "dataset")
                else:
                    skipped.append(
                        Skipped(
                            item,
                            f"{img_path}: no scale: no TIFF resolution tags, no mpp given, "
                            f"and {sub.name!r} is not a segmentation_WBC part with a known scale",
                        )
                    )
                    continue
            crop, used_mpp, used_src = _finish(image, box, fr, scale=sc, center=center)
            cell_type = _SEG_LABELS[label]
            out.append(
                CaptionSample(
                    image=crop,
                    caption=render_caption(cell_type, None, {}),
                    cell_type=cell_type,
                    case=None,
                    attributes={},
                    sample_id=f"{sub.name}_{int(image_id):03d}",
                    source="segmentation_wbc",
                    mpp=used_mpp,
                    mpp_source=used_src,
                )
            )
    return out
