"""One entry point for every dataset format: :func:`load_dataset` picks the reader by the file."""

from __future__ import annotations

from pathlib import Path

from hemblip.crops import CROP_PX, CROP_UM
from hemblip.datasets._common import SampleList, read_csv_table
from hemblip.datasets.demo import build_demo_dataset
from hemblip.datasets.generic_csv import read_generic_csv
from hemblip.datasets.leukemia_attri import read_leukemia_attri
from hemblip.datasets.wbcatt import is_wbcatt_header, read_wbcatt
from hemblip.errors import DatasetError

__all__ = ["load_dataset"]


def load_dataset(
    spec: str | Path,
    *,
    skip_missing: bool = False,
    crop_px: int | None = None,
    crop_um: float = CROP_UM,
) -> SampleList:
    """Load a dataset by its file: ``*.json`` -> LeukemiaAttri COCO; ``*.csv`` -> WBCAtt when it has
    WBCAtt's columns (``img_name``, ``label``, attributes) else generic; a directory -> its
    ``samples.csv`` (generic) or, for the shared-data folder (``txl_pbc/pbc_wbcatt.csv`` inside),
    :func:`build_demo_dataset`. ``crop_px`` (px) and ``crop_um`` (µm): the crop, as each reader's."""
    path = Path(spec)
    if path.is_dir():
        if (path / "samples.csv").is_file():
            return read_generic_csv(
                path / "samples.csv", skip_missing=skip_missing, crop_px=crop_px, crop_um=crop_um
            )
        if (path / "txl_pbc" / "pbc_wbcatt.csv").is_file():
            return build_demo_dataset(
                path, crop_px=CROP_PX if crop_px is None else crop_px, crop_um=crop_um
            )
        raise DatasetError(
            f"{path}: directory has no samples.csv and is not the shared data folder"
        )
    suffix = path.suffix.lower()
    if suffix == ".json":
        return read_leukemia_attri(
            path, skip_missing=skip_missing, crop_px=crop_px, crop_um=crop_um
        )
    if suffix == ".csv":
        header, _ = read_csv_table(path)
        if is_wbcatt_header(header):
            return read_wbcatt(
                path, path.parent, skip_missing=skip_missing, crop_px=crop_px, crop_um=crop_um
            )
        return read_generic_csv(path, skip_missing=skip_missing, crop_px=crop_px, crop_um=crop_um)
    if not path.exists():
        raise DatasetError(f"{path}: dataset file not found")
    raise DatasetError(f"{path}: unknown dataset format (expected .csv, .json or a directory)")
