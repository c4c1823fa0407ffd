"""BCCD: blood-smear fields (VOC XML boxes) with the type of their white cell(s) in a CSV."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from hemblip.captions import render_caption
from hemblip.crops import CROP_UM
from hemblip.datasets._common import (
    CaptionSample,
    SampleList,
    Skipped,
    _finish,
    _Framing,
    _load_image_mpp,
    _Scales,
    read_csv_table,
)
from hemblip.errors import DatasetError
from hemblip.ontology import cell_type_from_label

__all__ = ["BCCD_MPP", "read_bccd"]

#: µm/px of the BCCD images, measured the same way over 40 TXL-PBC train fields of the BCCD source.
BCCD_MPP = 0.085


def read_bccd(
    root: str | Path,
    *,
    crop_px: int | None = None,
    scale: float = 2.5,
    mpp: float | None = None,
    framing: str = "physical",
    crop_um: float = CROP_UM,
    pad: str = "reflect",
) -> SampleList:
    """Read the BCCD folder ``root`` (``wbc_types.csv``, ``Annotations/``, ``JPEGImages/``).

    One sample per image with exactly one typed WBC (one type in ``wbc_types.csv`` and one WBC
    box in the VOC XML), with a cell-type caption, cut as the job cuts a cell (see
    :mod:`hemblip.datasets`) around the box's centre; every other image is recorded in
    ``.skipped`` with its reason. Scale: TIFF tags, else ``mpp`` (µm/px), else :data:`BCCD_MPP`.
    """
    skipped: list[Skipped] = []
    samples = _read(Path(root), _Framing(framing, crop_um, crop_px, pad, scale, mpp), skipped)
    return SampleList(samples, skipped)


def _read(root: Path, fr: _Framing, skipped: list[Skipped]) -> list[CaptionSample]:
    types_csv = root / "wbc_types.csv"
    _header, rows = read_csv_table(types_csv)
    scales = _Scales()
    out = []
    for i, row in enumerate(rows, start=2):
        image_id = int(row["Image"])
        name = f"BloodImage_{image_id:05d}"
        item = f"{types_csv}:{i} ({name})"
        labels = [t.strip() for t in (row.get("Category") or "").split(",") if t.strip()]
        if not labels:
            skipped.append(Skipped(item, "no WBC type given"))
            continue
        if len(labels) > 1:
            skipped.append(Skipped(item, f"several WBCs ({', '.join(labels)}): ambiguous"))
            continue
        xml_path = root / "Annotations" / f"{name}.xml"
        img_path = root / "JPEGImages" / f"{name}.jpg"
        if not xml_path.is_file() or not img_path.is_file():
            skipped.append(Skipped(item, "image or annotation file not in the dataset"))
            continue
        try:
            tree = ET.parse(xml_path)
        except ET.ParseError as exc:
            skipped.append(Skipped(item, f"{xml_path}: unreadable XML ({exc})"))
            continue
        boxes = []
        for obj in tree.getroot().iter("object"):
            if (obj.findtext("name") or "").strip().upper() == "WBC":
                bb = obj.find("bndbox")
                boxes.append(tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
        if not boxes:
            skipped.append(Skipped(item, f"no WBC box in {xml_path.name}"))
            continue
        if len(boxes) > 1:
            skipped.append(Skipped(item, f"{len(boxes)} WBC boxes in {xml_path.name}: ambiguous"))
            continue
        cell_type = cell_type_from_label(labels[0])
        try:
            image, meta = _load_image_mpp(img_path)
            given, given_src = (BCCD_MPP, "dataset") if fr.mpp is None else (fr.mpp, "given")
            sc = (
                scales.get(img_path, image, meta, given, given_src, str(img_path))
                if fr.physical
                else None
            )
        except DatasetError as exc:
            skipped.append(Skipped(item, str(exc)))
            continue
        crop, used_mpp, used_src = _finish(image, boxes[0], fr, scale=sc)
        out.append(
            CaptionSample(
                image=crop,
                caption=render_caption(cell_type, None, {}),
                cell_type=cell_type,
                case=None,
                attributes={},
                sample_id=name,
                source="bccd",
                mpp=used_mpp,
                mpp_source=used_src,
            )
        )
    return out
