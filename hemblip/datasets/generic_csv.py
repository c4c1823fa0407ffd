"""The generic caption CSV: any images with captions and/or labels; also the format the demo
dataset is written in (:func:`write_generic_csv`)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from hemblip._paths import dataset_path
from hemblip.captions import parse_caption, render_caption
from hemblip.crops import CROP_UM
from hemblip.datasets._common import (
    _MPP_RANGE,
    SPLITS,
    CaptionSample,
    SampleList,
    _check_mpp,
    _finish,
    _Framing,
    _load_image_mpp,
    _norm_attr,
    _norm_case,
    _norm_cell_type,
    _row_box,
    _Scales,
    _skip_or_raise,
    _warn_skipped,
    read_csv_table,
)
from hemblip.errors import DatasetError
from hemblip.ontology import ATTRIBUTE_NAMES

__all__ = ["read_generic_csv", "write_generic_csv"]

_BOX_COLUMNS = ("x0", "y0", "x1", "y1")


def read_generic_csv(
    csv_path: str | Path,
    image_root: str | Path | None = None,
    *,
    skip_missing: bool = False,
    crop_px: int | None = None,
    scale: float = 2.5,
    mpp: float | None = None,
    framing: str = "physical",
    crop_um: float = CROP_UM,
    pad: str = "reflect",
) -> SampleList:
    """Read a generic caption CSV.

    Columns: ``image`` (path relative to ``image_root``, default the CSV's folder; required),
    optional box ``x0, y0, x1, y1`` px (the job's crop around its centre at the image's scale:
    TIFF tags, else an ``mpp`` column, else ``mpp``, else the red-cell estimate; blank = the
    image is already a crop, taken as given: padded to a square, resized to ``crop_px`` if
    given), and ``caption`` and/or any of ``cell_type``, ``case`` and ontology attribute columns
    (blank = unknown). A column present is the truth for its field (even when blank); fields
    without a column are parsed from the caption; without a caption, the caption is rendered
    from the columns. Optional ``sample_id``, ``source``, ``split`` (train/val/test), and for an
    image that is already a crop ``source_mpp``/``mpp_source``: the scale of the image it was
    cut from (as :func:`write_generic_csv` records it).
    """
    fr = _Framing(framing, crop_um, crop_px, pad, scale, mpp)
    scales = _Scales()
    path = Path(csv_path)
    root = Path(image_root) if image_root is not None else path.parent
    header, rows = read_csv_table(path)
    if "image" not in header:
        raise DatasetError(
            f"{path}: generic CSV needs an 'image' column (has: {', '.join(header)})"
        )
    attr_cols = [n for n in ATTRIBUTE_NAMES if n in header]
    has_labels = bool(attr_cols) or "cell_type" in header or "case" in header
    if "caption" not in header and not has_labels:
        raise DatasetError(f"{path}: needs a 'caption' column or cell_type/case/attribute columns")
    present_box = [c for c in _BOX_COLUMNS if c in header]
    if present_box and len(present_box) != 4:
        raise DatasetError(
            f"{path}: box needs all of x0, y0, x1, y1 (has {', '.join(present_box)})"
        )
    out, skipped = SampleList(), []
    for i, row in enumerate(rows, start=2):
        where = f"{path}:{i}"
        if not row.get("image"):
            raise DatasetError(f"{where}: empty 'image'")
        caption = row.get("caption") or ""
        if not caption and not has_labels:
            raise DatasetError(f"{where}: empty caption")
        # A column, even blank, is the truth for its field; fields without a column come from
        # the caption (when there is one).
        parsed = parse_caption(caption) if caption else None
        cell_type = (
            _norm_cell_type(row.get("cell_type"), where)
            if "cell_type" in header
            else parsed.cell_type
            if parsed
            else None
        )
        case = (
            _norm_case(row.get("case"), where)
            if "case" in header
            else parsed.case
            if parsed
            else None
        )
        attrs = {
            n: (
                _norm_attr(n, row.get(n), where)
                if n in attr_cols
                else parsed.attributes[n]
                if parsed
                else None
            )
            for n in ATTRIBUTE_NAMES
        }
        if not caption:
            caption = render_caption(cell_type, case, attrs)
        split = (row.get("split") or "").lower() or None
        if split is not None and split not in SPLITS:
            raise DatasetError(
                f"{where}: unknown split {split!r}; expected one of {', '.join(SPLITS)}"
            )
        box = _row_box(row, _BOX_COLUMNS, where) if present_box else None
        given = fr.mpp
        for col in ("mpp", "source_mpp"):
            if row.get(col) not in (None, "") and _check_mpp(row.get(col)) is None:
                raise DatasetError(
                    f"{where}: {col} must be µm/px within [{_MPP_RANGE[0]:g}, "
                    f"{_MPP_RANGE[1]:g}], got {row.get(col)!r}"
                )
        if row.get("mpp") not in (None, ""):
            given = _check_mpp(row["mpp"])
        try:
            img_path = dataset_path(root, row["image"])
            image, meta = _load_image_mpp(img_path)
            sc = (
                scales.get(img_path, image, meta, given, "given", str(img_path))
                if fr.physical and box is not None
                else None
            )
        except DatasetError as exc:
            _skip_or_raise(
                DatasetError(f"{where}: {exc}"), f"{where} ({row['image']})", skip_missing, skipped
            )
            continue
        crop, used_mpp, used_src = _finish(image, box, fr, scale=sc)
        if box is None and row.get("source_mpp") not in (None, ""):
            used_mpp = _check_mpp(row["source_mpp"])
            used_src = " ".join(str(row.get("mpp_source") or "").split())[:32] or None
        out.append(
            CaptionSample(
                image=crop,
                caption=caption,
                cell_type=cell_type,
                case=case,
                attributes=attrs,
                sample_id=row.get("sample_id") or Path(row["image"]).stem,
                source=row.get("source") or path.stem,
                split=split,
                mpp=used_mpp,
                mpp_source=used_src,
            )
        )
    out.skipped = skipped
    _warn_skipped(path, skipped)
    return out


def write_generic_csv(
    samples: Sequence[CaptionSample], out_dir: str | Path, name: str = "samples.csv"
) -> Path:
    """Write crops as PNG under ``out_dir/images/`` and a generic CSV that
    :func:`read_generic_csv` reads back to the same samples (crops taken as given; the scale
    they were cut at kept as ``source_mpp``/``mpp_source``). Returns the CSV path."""
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    csv_path = out / name
    cols = [
        "image",
        "sample_id",
        "source",
        "split",
        "caption",
        "cell_type",
        "case",
        *ATTRIBUTE_NAMES,
        "source_mpp",
        "mpp_source",
    ]
    seen: set[str] = set()
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for s in samples:
            stem = "".join(
                ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{s.source}_{s.sample_id}"
            )
            if stem in seen:
                raise DatasetError(f"{csv_path}: duplicate sample {s.source}/{s.sample_id}")
            seen.add(stem)
            rel = f"images/{stem}.png"
            Image.fromarray(s.image).save(out / rel)
            w.writerow(
                {
                    "image": rel,
                    "sample_id": s.sample_id,
                    "source": s.source,
                    "split": s.split or "",
                    "caption": s.caption,
                    "cell_type": s.cell_type or "",
                    "case": s.case or "",
                    **{n: s.attributes.get(n) or "" for n in ATTRIBUTE_NAMES},
                    "source_mpp": "" if s.mpp is None else repr(float(s.mpp)),
                    "mpp_source": s.mpp_source or "",
                }
            )
    return csv_path
