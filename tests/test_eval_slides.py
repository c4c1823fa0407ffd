"""``python -m pipeline eval-slides``: slide building, label transforms, matching, metrics, end to end."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, PipelineError
from pipeline.eval_slides import (
    EvalDataError,
    EvalSettings,
    _half,
    build_slide,
    detection_summary,
    duplicate_groups,
    load_fields,
    read_yolo_wbc,
    score_field,
    typed_summary,
)


def _field(h: int = 120, w: int = 160) -> np.ndarray:
    """A smooth pink field (JPEG keeps it) with a dark 'cell' at x 40-60, y 30-50."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([200 + 40 * xx / w, 150 + 60 * yy / h, 190 - 30 * xx / w], axis=2).astype(
        np.uint8
    )
    img[30:50, 40:60] = (90, 40, 120)
    return img


def _open(path: Path):
    import openslide

    return openslide.OpenSlide(str(path))


# --------------------------------------------------------------------------- slides
@pytest.mark.unit
@pytest.mark.parametrize("vendor", ["svs", "tiff"])
@pytest.mark.parametrize("error", [0.0, 0.15, -0.15])
def test_slide_opens_with_scale_in_metadata(tmp_path, vendor, error):
    s = EvalSettings(crop_um=4.0, scale_error=error)  # a 4 µm crop = 40 px at 0.1 µm/px
    g = build_slide(_field(), 0.1, tmp_path / f"a.{vendor}", s, vendor)
    with _open(tmp_path / f"a.{vendor}") as sl:
        assert sl.properties["openslide.vendor"] == (
            "aperio" if vendor == "svs" else "generic-tiff"
        )
        assert float(sl.properties["openslide.mpp-x"]) == pytest.approx(0.1 * (1 + error), rel=1e-4)
        assert sl.level_count == 3
        assert [round(d) for d in sl.level_downsamples] == [1, 2, 4]
        assert sl.dimensions == (g.width, g.height)
    assert g.mpp == 0.1 and g.mpp_written == pytest.approx(0.1 * (1 + error))
    # at least 3 crop sides (120 px) wide, and a crop side (40 px) of padding each way
    assert g.width >= 120 and g.height >= 120 and min(g.pad) >= 40


@pytest.mark.unit
def test_padding_is_mirrored_smear_not_glass(tmp_path):
    img = _field()
    g = build_slide(img, 0.1, tmp_path / "m.svs", EvalSettings(crop_um=6.0, jpeg_quality=95), "svs")
    with _open(tmp_path / "m.svs") as sl:
        lvl0 = np.asarray(sl.read_region((0, 0), 0, (g.width, g.height)).convert("RGB")).astype(int)
    field = lvl0[g.oy : g.oy + g.field_h, g.ox : g.ox + g.field_w]
    assert np.abs(field - img).mean() < 6
    left = lvl0[g.oy : g.oy + g.field_h, g.ox - 30 : g.ox]
    # reflect: column ox-1-k holds field column k+1
    assert np.abs(left[:, ::-1] - img[:, 1:31]).mean() < 6
    assert left.mean() < 225  # smear colour, not white glass
    # the dark cell is mirrored into the top padding too (rows oy-1-k <- k+1): a cut cell doubles
    top = lvl0[g.oy - 60 : g.oy, g.ox : g.ox + g.field_w]
    assert np.abs(top[::-1] - img[1:61]).mean() < 6


@pytest.mark.unit
def test_labels_follow_the_field_under_target_mpp(tmp_path):
    img = _field(200, 240)
    img[:] = 230
    img[100:140, 60:100] = 20  # the labelled cell, box (60, 100, 100, 140) px at 0.1 µm/px
    s = EvalSettings(crop_um=20.0, target_mpp=0.25, jpeg_quality=95)
    g = build_slide(img, 0.1, tmp_path / "t.tiff", s, "tiff")
    assert g.mpp == 0.25 and g.fx == pytest.approx(0.4) and g.fy == pytest.approx(0.4)
    assert (g.field_w, g.field_h) == (96, 80)
    x0, y0, x1, y1 = g.to_slide((60, 100, 100, 140))
    with _open(tmp_path / "t.tiff") as sl:
        assert float(sl.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-4)
        region = np.asarray(sl.read_region((g.ox, g.oy), 0, (g.field_w, g.field_h)).convert("L"))
    ys, xs = np.nonzero(region < 100)
    assert xs.mean() + g.ox == pytest.approx((x0 + x1) / 2, abs=1.0)
    assert ys.mean() + g.oy == pytest.approx((y0 + y1) / 2, abs=1.0)
    assert xs.max() - xs.min() + 1 == pytest.approx(x1 - x0, abs=2)
    # a slide-level centroid maps back into field px at the new scale
    assert g.to_field((x0 + x1) / 2, (y0 + y1) / 2) == pytest.approx((32.0, 48.0))


@pytest.mark.unit
@pytest.mark.parametrize(
    "kw",
    [
        {"scale_error": 0.5},
        {"scale_error": float("nan")},
        {"jpeg_quality": 0},
        {"jpeg_quality": 101},
        {"target_mpp": 0.0},
        {"target_mpp": float("inf")},
        {"limit": 0},
        {"split": "train"},
        {"slide_format": "ndpi"},
    ],
)
def test_bad_settings_are_one_line_config_errors(kw):
    with pytest.raises(ConfigError) as err:
        EvalSettings(**kw)
    assert "\n" not in str(err.value) and str(err.value).startswith("--")


# --------------------------------------------------------------------------- matching
@pytest.mark.unit
def test_detection_in_the_padding_is_not_scored():
    boxes = [(40, 40, 60, 60)]
    sc = score_field([(50, 50), (-10, 50), (50, 105), (100, 10)], boxes, 100, 100)
    assert (sc.tp, sc.fp, sc.fn, sc.outside) == (1, 0, 0, 3)


@pytest.mark.unit
def test_matching_is_one_to_one_and_greedy_by_distance_to_centre():
    # two detections in one box: one TP, one FP
    sc = score_field([(50, 50), (45, 45)], [(40, 40, 60, 60)], 100, 100)
    assert (sc.tp, sc.fp, sc.fn) == (1, 1, 0)
    assert sc.matches == [(0, 0)]  # the one nearer the centre
    # overlapping boxes: each detection takes the box whose centre is nearest
    boxes = [(20, 20, 60, 60), (40, 20, 80, 60)]  # centres (40, 40), (60, 40)
    sc = score_field([(58, 40), (42, 40)], boxes, 100, 100)
    assert (sc.tp, sc.fp, sc.fn) == (2, 0, 0)
    assert sorted(sc.matches) == [(0, 1), (1, 0)]
    # a missed box is a false negative
    sc = score_field([], boxes, 100, 100)
    assert (sc.tp, sc.fp, sc.fn) == (0, 0, 2)


@pytest.mark.unit
def test_cell_cut_by_the_field_edge_is_neither_required_nor_penalised():
    boxes = [(0, 30, 15, 50), (40, 40, 60, 60)]  # the first touches the left edge
    sc = score_field([(5, 40), (2, 45), (50, 50)], boxes, 100, 100)
    assert (sc.tp, sc.fp, sc.fn, sc.edge_boxes, sc.in_edge_cell) == (1, 0, 0, 1, 2)
    sc = score_field([(50, 50)], boxes, 100, 100)
    assert (sc.tp, sc.fp, sc.fn) == (1, 0, 0)


@pytest.mark.unit
def test_cell_within_edge_tolerance_is_cut_even_when_its_box_stops_short_of_the_edge():
    # A label box 3 px from the top edge: the cell meets its mirror image on the seam, and the
    # doubled cell's centroid lies on the seam (outside the field). With the 1 µm tolerance at
    # 0.085 µm/px (~12 px) it is cut by the edge; at the old 2 px it was a miss.
    boxes = [(100, 3, 200, 90)]
    seam = [(150, -1.0)]
    old = score_field(seam, boxes, 640, 480, edge_px=2.0)
    assert (old.fn, old.edge_boxes) == (1, 0)
    new = score_field(seam, boxes, 640, 480, edge_px=1.0 / 0.085)
    assert (new.tp, new.fp, new.fn, new.edge_boxes, new.outside) == (0, 0, 0, 1, 1)
    # the doubled cell's centroid just inside the field, between the box and the edge (0.2 px
    # in, the box starts at 3): on the cut cell, neither a hit nor a false positive
    inner = score_field([(150, 0.2)], boxes, 640, 480, edge_px=1.0 / 0.085)
    assert (inner.tp, inner.fp, inner.fn, inner.in_edge_cell) == (0, 0, 0, 1)
    assert score_field([(150, 0.2)], boxes, 640, 480, edge_px=2.0).fp == 1  # the old rule
    # a box 20 px (1.7 µm) from the edge is still required
    far = score_field([], [(100, 20, 200, 90)], 640, 480, edge_px=1.0 / 0.085)
    assert (far.fn, far.edge_boxes) == (1, 0)


@pytest.mark.unit
def test_one_cell_labelled_twice_counts_once():
    # TXL-PBC pairs seen on one cell: IoU 0.54-0.68; one detection finds the cell
    boxes = [(205, 86, 364, 186), (183, 76, 370, 233)]
    assert duplicate_groups(boxes) == [0, 0]
    sc = score_field([(280, 140)], boxes, 416, 416, edge_px=8)
    assert (sc.tp, sc.fp, sc.fn, sc.duplicate_boxes) == (1, 0, 0, 1)
    assert sc.matches == [(0, 0)]
    # without the merge one box is a false negative (the old rule)
    old = score_field([(280, 140)], boxes, 416, 416, edge_px=8, dedupe_iou=None)
    assert (old.tp, old.fn) == (1, 1)
    # both missed: one false negative, not two
    assert score_field([], boxes, 416, 416, edge_px=8).fn == 1
    # distinct touching cells (IoU 0.03) stay two cells
    pair = [(204, 219, 404, 450), (104, 376, 259, 478)]
    assert duplicate_groups(pair) == [0, 1]
    assert score_field([(300, 330)], pair, 640, 480, edge_px=1).fn == 1
    # a duplicate of an edge-cut box is cut with it
    cut = [(0, 30, 40, 70), (2, 28, 44, 72)]
    sc = score_field([(20, 50)], cut, 100, 100)
    assert (sc.tp, sc.fn, sc.edge_boxes, sc.in_edge_cell, sc.duplicate_boxes) == (0, 0, 1, 1, 1)


@pytest.mark.unit
def test_duplicate_groups_are_transitive_and_empty_is_empty():
    assert duplicate_groups([]) == []
    chain = [(0, 0, 10, 10), (1, 0, 11, 10), (2, 0, 12, 10)]
    assert duplicate_groups(chain) == [0, 0, 0]
    assert duplicate_groups([(0, 0, 10, 10), (0, 0, 0, 10)]) == [0, 1]  # degenerate box


@pytest.mark.unit
def test_detection_summary_per_source_and_overall():
    a = score_field([(50, 50), (10, 10)], [(40, 40, 60, 60)], 100, 100)  # 1 TP 1 FP
    b = score_field([], [(40, 40, 60, 60), (10, 10, 20, 20)], 100, 100)  # 2 FN
    out = detection_summary([("pbc", a), ("raabin", b)])
    assert out["pbc"]["precision"] == 0.5 and out["pbc"]["recall"] == 1.0
    assert out["raabin"]["precision"] is None and out["raabin"]["recall"] == 0.0
    assert out["overall"]["tp"] == 1 and out["overall"]["fn"] == 2 and out["overall"]["fields"] == 2


@pytest.mark.unit
def test_typed_summary_confusion_gap_and_missed_cells():
    from hemblip.ontology import ATTRIBUTE_NAMES

    def lab(ct, size=None):
        return {
            "cell_type": ct,
            "attributes": {n: (size if n == "cell_size" else None) for n in ATTRIBUTE_NAMES},
        }

    cells = [
        {
            "group": "pbc",
            "cell_type": "lymphocyte",
            "attributes": {"cell_size": "small"},
            "e2e": lab("monocyte", "big"),
            "crop": lab("lymphocyte", "small"),
        },
        {
            "group": "pbc",
            "cell_type": "neutrophil",
            "attributes": {"cell_size": "big"},
            "e2e": lab("neutrophil", "big"),
            "crop": lab("neutrophil", "big"),
        },
        {
            "group": "pbc",
            "cell_type": "monocyte",
            "attributes": {"cell_size": "big"},
            "e2e": None,
            "crop": lab("monocyte", "big"),
        },  # missed by detection
        {
            "group": "bccd",
            "cell_type": "eosinophil",
            "attributes": {},
            "e2e": lab("eosinophil"),
            "crop": lab(None),
        },
    ]
    out = typed_summary(cells)
    pbc = out["pbc"]
    assert (pbc["n_typed"], pbc["n_matched"]) == (3, 2)
    assert (
        pbc["cell_type"]["e2e"]["accuracy"] == 0.5 and pbc["cell_type"]["crops"]["accuracy"] == 1.0
    )
    assert pbc["cell_type"]["gap"] == -0.5
    assert pbc["cell_type"]["e2e_all_typed_accuracy"] == pytest.approx(1 / 3)
    conf = pbc["cell_type"]["e2e"]["confusion"]
    row = conf["matrix"][conf["labels"].index("lymphocyte")]
    assert row[conf["columns"].index("monocyte")] == 1
    size = pbc["attributes"]["per_attribute"]["cell_size"]
    assert (size["e2e"], size["crops"], size["n"]) == (0.5, 1.0, 2)
    assert len(pbc["attributes"]["per_attribute"]) == 11
    bccd = out["bccd"]["cell_type"]
    assert bccd["e2e"]["accuracy"] == 1.0 and bccd["crops"]["accuracy"] == 0.0
    assert "(none)" in bccd["crops"]["confusion"]["columns"]
    assert out["all"]["n_typed"] == 4


@pytest.mark.unit
def test_typed_summary_without_crops_keeps_the_end_to_end_figures():
    cells = [
        {
            "group": "pbc",
            "cell_type": "lymphocyte",
            "attributes": {"cell_size": "small"},
            "e2e": {"cell_type": "lymphocyte", "attributes": {"cell_size": "small"}},
            "crop": None,
        }
    ]
    out = typed_summary(cells)["pbc"]
    assert out["n_matched"] == 1 and out["n_crops"] == 0
    assert out["cell_type"]["e2e"]["accuracy"] == 1.0
    assert out["cell_type"]["crops"]["accuracy"] is None and out["cell_type"]["gap"] is None
    assert out["attributes"]["per_attribute"]["cell_size"]["e2e"] == 1.0


# --------------------------------------------------------------------------- labelled data
@pytest.mark.unit
def test_malformed_yolo_line_names_file_and_line(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("0 0.5 0.5 0.2 0.2\n0 0.5 oops 0.2 0.2\n")
    with pytest.raises(EvalDataError, match=r"x\.txt:2: "):
        read_yolo_wbc(p, 100, 100)
    p.write_text("0 0.5 0.5 -0.2 0.2\n")
    with pytest.raises(EvalDataError, match=r"x\.txt:1: "):
        read_yolo_wbc(p, 100, 100)
    assert isinstance(EvalDataError("x"), PipelineError) and isinstance(
        EvalDataError("x"), ValueError
    )


def _uid(split: str, stem: str) -> str:
    """An id whose fixed hash half is ``split``."""
    k = 0
    while _half(f"{stem}-{k:04d}") != split:
        k += 1
    return f"{stem}-{k:04d}"


_PBC_ATTRS = (
    "cell_size,cell_shape,nucleus_shape,nuclear_cytoplasmic_ratio,chromatin_density,"
    "cytoplasm_vacuole,cytoplasm_texture,cytoplasm_colour,granule_type,granule_colour,granularity"
)


def _mini_data(root: Path, shared: Path) -> dict:
    """A shared-data folder holding a few real fields: one PBC cell of WBCAtt's val split in
    TXL val, the same PBC image as a TXL train field (scale estimate), one Raabin val field of
    the val hash half and a Raabin train field, plus a hostile id row."""
    src = shared / "txl_pbc"
    smap = list(csv.DictReader(io.StringIO((src / "source_map.csv").read_text(encoding="utf-8"))))
    pbc_rows = list(
        csv.DictReader(io.StringIO((src / "pbc_wbcatt.csv").read_text(encoding="utf-8")))
    )
    pbc = next(r for r in pbc_rows if r["wbcatt_split"] == "val" and r["n_wbc_boxes"] == "1")
    pbc_uuid = Path(pbc["image"]).stem
    raabin = next(
        r
        for r in smap
        if r["source"] == "raabin_wbc?" and r["txl_split"] == "val" and r["n_wbc"] == "1"
    )
    for d in ("images/train", "images/val", "labels/train", "labels/val"):
        (root / "txl_pbc" / d).mkdir(parents=True, exist_ok=True)
    ids = {"pbc": _uid("val", "pbcfield"), "raabin": _uid("val", "raabinfield")}

    def copy(uuid_src, txl_split_src, uid, split):
        shutil.copy(
            src / "images" / txl_split_src / f"{uuid_src}.jpg",
            root / "txl_pbc" / "images" / split / f"{uid}.jpg",
        )
        shutil.copy(
            src / "labels" / txl_split_src / f"{uuid_src}.txt",
            root / "txl_pbc" / "labels" / split / f"{uid}.txt",
        )

    pbc_split = pbc["txl_split"]
    copy(pbc_uuid, pbc_split, ids["pbc"], "val")
    copy(pbc_uuid, pbc_split, "pbctrain", "train")
    copy(raabin["uuid"], "val", ids["raabin"], "val")
    copy(raabin["uuid"], "val", "raabintrain", "train")
    head = "uuid,txl_split,width,height,source,original_name,n_wbc,n_rbc,n_platelets,wbcatt_split,wbcatt_label\n"
    lines = [
        f"{ids['pbc']},val,360,363,pbc,{pbc['img_name']},1,0,0,val,{pbc['label']}",
        "pbctrain,train,360,363,pbc,,1,0,0,,",
        f"{ids['raabin']},val,575,575,raabin_wbc?,,1,0,0,,",
        "raabintrain,train,575,575,raabin_wbc?,,1,0,0,,",
        "../../etc/passwd,val,575,575,raabin_wbc?,,1,0,0,,",
    ]
    (root / "txl_pbc" / "source_map.csv").write_text(head + "\n".join(lines) + "\n")
    row = dict(pbc, image=f"TXL_PBC/images/val/{ids['pbc']}.jpg", txl_split="val")
    with open(root / "txl_pbc" / "pbc_wbcatt.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(pbc))
        w.writeheader()
        w.writerow(row)
    return {"ids": ids, "pbc": pbc}


@pytest.mark.unit
def test_load_fields_splits_and_refuses_hostile_ids(tmp_path, shared_data):
    info = _mini_data(tmp_path, shared_data)

    class S:  # the caption dataset's view of the PBC cell
        def __init__(self, split):
            self.split, self.source, self.cell_type = split, "pbc", "lymphocyte"
            self.attributes = {"cell_size": "small"}

    sample_id = Path(info["pbc"]["img_name"]).stem
    skipped: list[str] = []
    val = load_fields(tmp_path, "val", {sample_id: S("val")}, skipped=skipped)
    assert {f.field_id for f in val} == set(info["ids"].values())
    pbc = next(f for f in val if f.source == "pbc")
    assert pbc.typed is not None and pbc.typed.sample_id == sample_id and pbc.score_detection
    assert all(
        f.field_id not in ("pbctrain", "raabintrain") for f in val
    )  # detector trained on them
    assert len(skipped) == 1 and "passwd" in skipped[0] and "not a plain image id" in skipped[0]
    # a cell of the caption model's training split is never scored for captions
    val_train_cell = load_fields(tmp_path, "val", {sample_id: S("train")})
    assert all(f.typed is None for f in val_train_cell)
    assert load_fields(tmp_path, "test", {sample_id: S("val")}) == []


@pytest.mark.unit
def test_a_txl_test_split_is_all_test_and_never_val(tmp_path, shared_data):
    # A data folder with TXL-PBC's held-out test split listed: its fields are detector-unseen
    # and all go to --split test (before: skipped as an unknown split, so no test field at all).
    info = _mini_data(tmp_path, shared_data)
    txl = tmp_path / "txl_pbc"
    (txl / "images" / "test").mkdir()
    (txl / "labels" / "test").mkdir()
    rid = info["ids"]["raabin"]
    ids = [_uid("val", "txltest"), _uid("test", "txltest")]  # either hash half
    for uid in ids:
        shutil.copy(txl / "images" / "val" / f"{rid}.jpg", txl / "images" / "test" / f"{uid}.jpg")
        shutil.copy(txl / "labels" / "val" / f"{rid}.txt", txl / "labels" / "test" / f"{uid}.txt")
    with open(txl / "source_map.csv", "a", encoding="utf-8") as fh:
        for uid in ids:
            fh.write(f"{uid},test,575,575,raabin_wbc?,,1,0,0,,\n")
    skipped: list[str] = []
    test = load_fields(tmp_path, "test", {}, skipped=skipped)
    got = {f.field_id: f for f in test}
    assert set(ids) <= set(got) and all(got[i].score_detection for i in ids)
    assert all(got[i].origin == "TXL test" and got[i].boxes for i in ids)
    assert not any("unknown source" in m for m in skipped)
    assert not set(ids) & {f.field_id for f in load_fields(tmp_path, "val", {})}


# --------------------------------------------------------------------------- end to end
def _run(tmp_path, shared_data, argv_extra, capsys):
    from pipeline.__main__ import main

    data = tmp_path / "data"
    _mini_data(data, shared_data)
    out_json = tmp_path / "rep.json"
    rc = main(
        [
            "eval-slides",
            "--data",
            str(data),
            "--json",
            str(out_json),
            "--caption-batch-size",
            "4",
            *argv_extra,
        ]
    )
    text = capsys.readouterr().out
    rep = json.loads(out_json.read_text())
    return rc, text, rep


@pytest.mark.integration
def test_eval_slides_end_to_end_local(tmp_path, shared_data, ray_cluster, capsys):
    rc, text, rep = _run(tmp_path, shared_data, ["--work", str(tmp_path / "w")], capsys)
    assert rc == 0, text
    assert rep["fields"]["pbc"] == 1 and rep["fields"]["raabin"] == 1
    assert rep["job"]["slides_ok"] == 2 and not rep["failures"]
    # the job read the scale the slide's metadata states
    assert all(
        f["mpp_source"] == "metadata" and f["mpp_read"] == pytest.approx(f["mpp_written"], rel=1e-4)
        for f in rep["per_field"]
    )
    det = rep["detection"]["overall"]
    assert det["tp"] + det["fn"] == 2 and det["recall"] is not None
    pbc = rep["typed"]["pbc"]
    assert pbc["n_typed"] == 1
    assert len(pbc.get("attributes", {}).get("per_attribute", {})) in (0, 11)
    assert "Detection" in text and "Cell type" in text


@pytest.mark.integration
def test_eval_slides_via_s3_with_variants(tmp_path, shared_data, ray_cluster, s3_server, capsys):
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(
        Bucket="evalslides"
    )
    rc, text, rep = _run(
        tmp_path,
        shared_data,
        [
            "--s3-endpoint",
            s3_server,
            "--s3-prefix",
            "s3://evalslides/runs/",
            "--limit",
            "1",
            "--target-mpp",
            "0.25",
            "--scale-error",
            "0.15",
            "--jpeg-quality",
            "70",
            "--no-crops",
        ],
        capsys,
    )
    assert rc == 0, text
    assert rep["job"]["input"].startswith("s3://evalslides/runs/eval-slides-")
    assert rep["job"]["slides_ok"] == 2
    assert rep["condition"] == "0.25 µm/px, scale +15 %, q70"
    for f in rep["per_field"]:
        assert f["mpp_true"] == 0.25 and f["mpp_read"] == pytest.approx(0.2875, rel=1e-4)
    assert rep["detection"]["overall"]["recall"] is not None


@pytest.mark.unit
@pytest.mark.parametrize(
    "prefix",
    [
        "bucket/prefix/",
        "s3://",
        "s3://B_ad/x/",
        "s3://bucket/../x/",
        "s3://bucket/a//b/",
        "https://bucket/x/",
    ],
)
def test_bad_s3_prefix_is_refused_before_any_work(prefix):
    from pipeline.eval_slides import _parse_s3_prefix

    with pytest.raises(ConfigError, match="--s3-prefix"):
        _parse_s3_prefix(prefix)
    assert _parse_s3_prefix("s3://evalslides/runs") == ("evalslides", "runs/")


# --------------------------------------------------------------------------- consistency check as a detector
def _typed(labels, claims, flagged=(), morph=None, group="pbc"):
    """A typed cell whose job row claims ``claims``, was flagged on ``flagged``, measured ``morph``."""
    e2e = None
    if claims is not None:
        e2e = {
            "cell_type": "neutrophil",
            "attributes": dict(claims),
            "consistent": not flagged,
            "inconsistent_attributes": list(flagged),
            "morphometry": dict(morph or {}),
        }
    return {
        "group": group,
        "cell_type": "neutrophil",
        "attributes": labels,
        "e2e": e2e,
        "crop": None,
    }


@pytest.mark.unit
def test_consistency_detector_precision_and_recall_per_attribute_and_cell():
    from pipeline import consistency as C
    from pipeline.eval_slides import consistency_as_detector

    big = C.CELL_SIZE_BIG_MIN_UM - 3  # a diameter that contradicts "big"
    cells = [
        # wrong size claim, flagged: a hit
        _typed(
            {"cell_size": "small"}, {"cell_size": "big"}, ["cell_size"], {"cell_diameter_um": big}
        ),
        # right size claim, flagged: a false flag
        _typed(
            {"cell_size": "big"}, {"cell_size": "big"}, ["cell_size"], {"cell_diameter_um": big}
        ),
        # wrong size claim, not flagged, but comparable: a miss the band let through
        _typed({"cell_size": "small"}, {"cell_size": "big"}, [], {"cell_diameter_um": 30.0}),
        # wrong size claim with no measurement: a miss the check could not compare
        _typed({"cell_size": "small"}, {"cell_size": "big"}, [], {}),
        # N:C wrong, not flagged; size right, not flagged
        _typed(
            {"cell_size": "big", "nuclear_cytoplasmic_ratio": "high"},
            {"cell_size": "big", "nuclear_cytoplasmic_ratio": "low"},
            [],
            {"cell_diameter_um": 30.0, "nc_ratio": 2.0},
        ),
        # size not stated by the caption: not wrong (nothing to flag), still counted in n
        _typed({"cell_size": "big"}, {"cell_size": None}, [], {"cell_diameter_um": 30.0}),
    ]
    out = consistency_as_detector(cells)
    size = out["per_attribute"]["cell_size"]
    assert {
        k: size[k]
        for k in ("n", "stated", "checked", "flagged", "wrong", "wrong_checked", "flagged_wrong")
    } == {
        "n": 6,
        "stated": 5,
        "checked": 4,
        "flagged": 2,
        "wrong": 3,
        "wrong_checked": 2,
        "flagged_wrong": 1,
    }
    assert size["precision"] == 0.5
    assert size["recall"] == pytest.approx(1 / 3)
    assert size["recall_checked"] == 0.5
    nc = out["per_attribute"]["nuclear_cytoplasmic_ratio"]
    assert (nc["n"], nc["wrong"], nc["flagged"], nc["precision"], nc["recall"]) == (
        1,
        1,
        0,
        None,
        0.0,
    )
    shape = out["per_attribute"]["nucleus_shape"]
    assert shape["n"] == 0 and shape["precision"] is None and shape["recall"] is None
    cell = out["cells"]
    # flagged cells: #1 #2; wrong cells: #1 #3 #4 #5; a hit only where the flagged attribute is wrong
    assert (cell["n"], cell["flagged"], cell["wrong"], cell["flagged_wrong"]) == (6, 2, 4, 1)
    assert cell["precision"] == 0.5 and cell["recall"] == 0.25


@pytest.mark.unit
def test_consistency_detector_reports_only_the_attributes_the_check_covers():
    from pipeline.consistency import COMPARED_ATTRIBUTES
    from pipeline.eval_slides import consistency_as_detector, format_consistency

    # a wrong colour claim that the check does not cover: not reported, and not a wrong cell
    cells = [
        _typed(
            {"cytoplasm_colour": "blue", "cell_size": "big"},
            {"cytoplasm_colour": "purple", "cell_size": "big"},
            [],
            {"cell_diameter_um": 30.0},
        )
    ]
    out = consistency_as_detector(cells)
    assert tuple(out["per_attribute"]) == COMPARED_ATTRIBUTES
    assert "cytoplasm_colour" not in out["per_attribute"]
    assert out["cells"]["wrong"] == 0 and out["cells"]["n"] == 1
    text = "\n".join(format_consistency(out))
    assert "cell_size" in text and "cytoplasm_colour" not in text


@pytest.mark.unit
def test_consistency_detector_skips_unlabelled_and_unmatched_cells():
    from pipeline.eval_slides import consistency_as_detector, format_consistency

    flagged_big = {"cell_size": "big"}
    cells = [
        _typed(
            {}, flagged_big, ["cell_size"], {"cell_diameter_um": 5.0}, group="bccd"
        ),  # type only
        _typed(None, flagged_big, ["cell_size"], {"cell_diameter_um": 5.0}),  # no labels at all
        _typed(
            {"cell_size": None}, flagged_big, ["cell_size"], {"cell_diameter_um": 5.0}
        ),  # not labelled for it
        _typed({"cell_size": "small"}, None),  # missed by detection: no row
    ]
    out = consistency_as_detector(cells)
    assert out["cells"]["n"] == 0 and out["per_attribute"]["cell_size"]["n"] == 0
    assert out["cells"]["precision"] is None and out["cells"]["recall"] is None
    assert format_consistency(out) == []  # nothing scored: no table


@pytest.mark.unit
def test_row_check_carries_the_verdict_and_the_morphometry_as_json_numbers():
    from pipeline.eval_slides import CHECK_MORPHOMETRY, _row_check

    row = {
        "consistent": False,
        "inconsistent_attributes": np.array(["nuclear_cytoplasmic_ratio"]),
        "cell_diameter_um": 14.2,
        "nc_ratio": float("inf"),
        "nucleus_circularity": float("nan"),
        "nucleus_lobes": 2,
        "caption": "x",
    }
    got = _row_check(row)
    assert got == {
        "consistent": False,
        "inconsistent_attributes": ["nuclear_cytoplasmic_ratio"],
        "morphometry": {
            "cell_diameter_um": 14.2,
            "nc_ratio": None,
            "nucleus_circularity": None,
            "nucleus_lobes": 2,
        },
    }
    assert tuple(got["morphometry"]) == CHECK_MORPHOMETRY
    json.dumps(got, allow_nan=False)  # strict JSON: no NaN / Infinity
    assert (
        _row_check({})["inconsistent_attributes"] is None
    )  # no check ran: unknown, not "none flagged"
