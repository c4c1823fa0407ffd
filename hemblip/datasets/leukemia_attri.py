"""LeukemiaAttri-style COCO JSON: leukaemia cells with their case and 7 attributes each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hemblip._paths import dataset_path
from hemblip.captions import render_caption
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
    _Scales,
    _skip_or_raise,
    _warn_skipped,
)
from hemblip.errors import DatasetError
from hemblip.ontology import LEUKEMIA_ATTRI_FIELDS

__all__ = ["read_leukemia_attri"]

_CASE_FIELDS = ("case", "case_context", "diagnosis", "leukemia_type", "cancer_type")


def read_leukemia_attri(
    coco_json: str | Path,
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
    """Read LeukemiaAttri-style COCO JSON: one sample per annotation, cropped around its bbox.

    Accepted fields: ``images[]``: ``id``, ``file_name`` (relative to ``image_root``, default the
    JSON's folder), optional case field; ``categories[]``: ``id``, ``name`` (the cell type);
    ``annotations[]``: ``id``, ``image_id``, ``category_id``, ``bbox`` = [x, y, w, h] px, and the
    attribute fields ``cell_size, nuclear_chromatin, nuclear_shape, nucleolus, cytoplasm,
    cytoplasmic_basophilia, cytoplasmic_vacuoles`` either on the annotation or in its
    ``attributes`` object (value words case-insensitive; missing/blank = unknown). The case is the
    first of ``case, case_context, diagnosis, leukemia_type, cancer_type`` on the annotation, its
    ``attributes``, or else the image (a code such as ``AML`` or the full name). The crop is the
    job's around the bbox centre, at the image's scale: TIFF tags, else an image's ``mpp`` field,
    else ``mpp``, else its red-cell estimate (:mod:`hemblip.datasets`).
    """
    fr = _Framing(framing, crop_um, crop_px, pad, scale, mpp)
    scales = _Scales()
    path = Path(coco_json)
    root = Path(image_root) if image_root is not None else path.parent
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not all(
        isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise DatasetError(
            f"{path}: not COCO JSON: needs lists 'images', 'annotations', 'categories'"
        )
    categories = {}
    for c in doc["categories"]:
        categories[c.get("id")] = _norm_cell_type(c.get("name"), f"{path}: category {c.get('id')}")
    images = {im.get("id"): im for im in doc["images"]}
    cache: dict[object, tuple[np.ndarray, float | None] | DatasetError] = {}
    out, skipped = SampleList(), []
    for k, ann in enumerate(doc["annotations"]):
        ann_id = ann.get("id", k)
        where = f"{path}: annotation {ann_id}"
        im = images.get(ann.get("image_id"))
        if im is None:
            raise DatasetError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in categories:
            raise DatasetError(
                f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'"
            )
        bbox = ann.get("bbox")
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, int | float) for v in bbox)
            and bbox[2] > 0
            and bbox[3] > 0
        ):
            raise DatasetError(f"{where}: bbox must be [x, y, w, h] with w, h > 0, got {bbox!r}")
        extra = ann.get("attributes") if isinstance(ann.get("attributes"), dict) else {}
        attrs = {}
        for field_name, name in LEUKEMIA_ATTRI_FIELDS.items():
            raw = ann.get(field_name, extra.get(field_name))
            attrs[name] = _norm_attr(name, raw, where)
        raw_case = next(
            (
                src[f]
                for src in (ann, extra, im)
                for f in _CASE_FIELDS
                if src.get(f) not in (None, "")
            ),
            None,
        )
        case = _norm_case(raw_case, where)
        cell_type = categories[ann["category_id"]]
        key = im.get("id")
        if key not in cache:
            try:
                cache[key] = _load_image_mpp(dataset_path(root, str(im.get("file_name", ""))))
            except DatasetError as exc:
                cache[key] = exc
        loaded = cache[key]
        if isinstance(loaded, DatasetError):
            _skip_or_raise(DatasetError(f"{where}: {loaded}"), where, skip_missing, skipped)
            continue
        image, meta = loaded
        sc = None
        if fr.physical:
            given, given_src = fr.mpp, "given"
            if im.get("mpp") not in (None, ""):
                given = _check_mpp(im.get("mpp"))
                if given is None:
                    raise DatasetError(
                        f"{where}: image mpp must be µm/px within [{_MPP_RANGE[0]:g}, "
                        f"{_MPP_RANGE[1]:g}], got {im.get('mpp')!r}"
                    )
            try:
                sc = scales.get(key, image, meta, given, given_src, str(im.get("file_name")))
            except DatasetError as exc:
                _skip_or_raise(DatasetError(f"{where}: {exc}"), where, skip_missing, skipped)
                continue
        x, y, w, h = (float(v) for v in bbox)
        crop, used_mpp, used_src = _finish(image, (x, y, x + w, y + h), fr, scale=sc)
        split = str(im.get("split") or ann.get("split") or "").lower() or None
        out.append(
            CaptionSample(
                image=crop,
                caption=render_caption(cell_type, case, attrs),
                cell_type=cell_type,
                case=case,
                attributes=attrs,
                sample_id=f"{Path(str(im.get('file_name'))).stem}#{ann_id}",
                source="leukemia_attri",
                split=split if split in SPLITS else None,
                mpp=used_mpp,
                mpp_source=used_src,
            )
        )
    out.skipped = skipped
    _warn_skipped(path, skipped)
    return out
