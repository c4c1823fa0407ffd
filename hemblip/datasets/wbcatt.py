"""WBCAtt: healthy PBC cells with 11 morphology attributes each (CSV), and the TXL-PBC join."""

from __future__ import annotations

from pathlib import Path

from hemblip._paths import dataset_path
from hemblip.captions import render_caption
from hemblip.crops import CROP_UM
from hemblip.datasets._common import (
    SPLITS,
    CaptionSample,
    SampleList,
    _finish,
    _Framing,
    _load_image_mpp,
    _norm_attr,
    _norm_cell_type,
    _row_box,
    _Scales,
    _skip_or_raise,
    _warn_skipped,
    read_csv_table,
)
from hemblip.errors import DatasetError
from hemblip.ontology import HEALTHY_ATTRIBUTES

__all__ = ["PBC_MPP", "is_wbcatt_header", "read_wbcatt"]

_HEALTHY_NAMES = tuple(a.name for a in HEALTHY_ATTRIBUTES)
#: µm/px of the PBC images (one instrument, CellaVision DM96, one magnification: one scale, as a
#: scanner writes one per instrument). The median red-cell estimate over 40 TXL-PBC train fields
#: of the PBC source (``pipeline.eval_slides.source_scales``; the PBC images' own per-image
#: estimates have median 0.111 but vary ±40 %, which would teach the model a size cue the job
#: never shows: the job reads one scale per slide). WBCAtt's cells are all PBC images.
PBC_MPP = 0.109


def is_wbcatt_header(header: list[str]) -> bool:
    """Whether a CSV header is WBCAtt's own (``img_name``, ``label`` and the 11 attributes)."""
    return "label" in header and "img_name" in header and all(n in header for n in _HEALTHY_NAMES)


# --------------------------------------------------------------------------- WBCAtt
def _txl_label_box(image_path: Path, width: int, height: int) -> tuple[float, ...] | None:
    """TXL-PBC YOLO labels beside images/<split>/<uuid>.jpg: the WBC box nearest the centre."""
    label = (
        image_path.parent.parent.parent
        / "labels"
        / image_path.parent.name
        / (image_path.stem + ".txt")
    )
    if not label.is_file():
        return None
    best, best_d = None, None
    for line in label.read_text().splitlines():
        parts = line.split()
        if len(parts) != 5 or parts[0] != "0":
            continue
        cx, cy, w, h = (float(p) for p in parts[1:])
        d = (cx - 0.5) ** 2 + (cy - 0.5) ** 2
        if best_d is None or d < best_d:
            best_d = d
            best = (
                (cx - w / 2) * width,
                (cy - h / 2) * height,
                (cx + w / 2) * width,
                (cy + h / 2) * height,
            )
    return best


def _wbcatt_image(row: dict[str, str], root: Path) -> Path:
    candidates: list[Path] = []
    # Every name in the row is checked, not only the one that exists: a row naming a path
    # outside the image root is refused as a whole.
    if row.get("image"):
        first = dataset_path(root, row["image"])
        parts = row["image"].split("/")
        candidates += (
            [first, dataset_path(root, "/".join(parts[1:]))] if len(parts) > 1 else [first]
        )
    if row.get("path"):
        candidates.append(dataset_path(root, row["path"]))
    if row.get("img_name"):
        candidates.append(dataset_path(root, row["img_name"]))
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0] if candidates else root


def read_wbcatt(
    csv_path: str | Path,
    image_root: str | Path,
    *,
    skip_missing: bool = False,
    crop_px: int | None = None,
    scale: float = 2.5,
    mpp: float | None = None,
    framing: str = "physical",
    crop_um: float = CROP_UM,
    pad: str = "reflect",
) -> SampleList:
    """Read a WBCAtt attribute CSV (healthy PBC cells, case ``"healthy"``).

    Columns: ``img_name, label, <11 WBCAtt attributes>, path`` (WBCAtt's own files), or the
    TXL-PBC join ``image, img_name, wbcatt_split, label, <11 attributes>, wbc_xmin..wbc_ymax``.
    The image is found at ``image_root/image`` (also without its first path part),
    ``image_root/path`` or ``image_root/img_name``. The crop is the job's (:mod:`hemblip.datasets`)
    around the WBC box's centre (px); without a box in the row, the TXL YOLO WBC box beside the
    image nearest its centre, else the image centre (PBC images are cell-centred). ``mpp``: µm/px
    of images without TIFF resolution tags (default: :data:`PBC_MPP`, WBCAtt's images being PBC's;
    ``mpp_source`` "dataset"). ``split``
    comes from ``wbcatt_split`` or from the file name (``..._train.csv``). ``crop_px``: crop side
    (default 224; with ``framing="box"``, default the box crop's own size).
    """
    path = Path(csv_path)
    root = Path(image_root)
    header, rows = read_csv_table(path)
    missing = [c for c in ("label", *_HEALTHY_NAMES) if c not in header]
    if missing or not ({"img_name", "image", "path"} & set(header)):
        raise DatasetError(
            f"{path}: not a WBCAtt CSV: missing column(s) "
            f"{', '.join(missing) or 'img_name/image/path'}"
        )
    file_split = next((s for s in SPLITS if path.stem.lower().endswith(s)), None)
    fr = _Framing(framing, crop_um, crop_px, pad, scale, PBC_MPP if mpp is None else mpp)
    given_src = "dataset" if mpp is None else "given"
    scales = _Scales()
    out, skipped = SampleList(), []
    for i, row in enumerate(rows, start=2):
        where = f"{path}:{i}"
        cell_type = _norm_cell_type(row.get("label"), where)
        attrs = {n: _norm_attr(n, row.get(n), where) for n in _HEALTHY_NAMES}
        split = (row.get("wbcatt_split") or file_split or "").lower() or None
        if split is not None and split not in SPLITS:
            raise DatasetError(f"{where}: unknown split {split!r}")
        try:
            img_path = _wbcatt_image(row, root)
        except DatasetError as exc:
            _skip_or_raise(DatasetError(f"{where}: {exc}"), where, skip_missing, skipped)
            continue
        box = _row_box(row, ("wbc_xmin", "wbc_ymin", "wbc_xmax", "wbc_ymax"), where)
        try:
            image, meta = _load_image_mpp(img_path)
            sc = (
                scales.get(img_path, image, meta, fr.mpp, given_src, str(img_path))
                if fr.physical
                else None
            )
        except DatasetError as exc:
            _skip_or_raise(
                DatasetError(f"{where}: {exc}"), f"{where} ({img_path.name})", skip_missing, skipped
            )
            continue
        if box is None:
            box = _txl_label_box(img_path, image.shape[1], image.shape[0])
        center = (image.shape[1] / 2, image.shape[0] / 2) if box is None else None
        crop, used_mpp, used_src = _finish(image, box, fr, scale=sc, center=center)
        sample_id = Path(row.get("img_name") or img_path.name).stem
        out.append(
            CaptionSample(
                image=crop,
                caption=render_caption(cell_type, "healthy", attrs),
                cell_type=cell_type,
                case="healthy",
                attributes=attrs,
                sample_id=sample_id,
                source="wbcatt",
                split=split,
                mpp=used_mpp,
                mpp_source=used_src,
            )
        )
    out.skipped = skipped
    _warn_skipped(path, skipped)
    return out
