"""Dataset readers, cropping, splits and the demo dataset (real shared files where available)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hemblip.captions import parse_caption
from hemblip.crops import cell_crop
from hemblip.data import (
    BCCD_MPP,
    PBC_MPP,
    CaptionSample,
    build_demo_dataset,
    crop_around_box,
    load_dataset,
    read_generic_csv,
    read_leukemia_attri,
    read_wbcatt,
    split_samples,
    write_generic_csv,
)
from hemblip.errors import DatasetError
from hemblip.ontology import ATTRIBUTE_NAMES, HEALTHY_ATTRIBUTES

pytestmark = pytest.mark.unit

FIXTURE = Path(__file__).parent / "fixtures" / "leukemia_attri"
HEALTHY = [a.name for a in HEALTHY_ATTRIBUTES]


def _img(path: Path, w: int = 40, h: int = 30, value: int = 100) -> Path:
    arr = np.full((h, w, 3), value, np.uint8)
    arr[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = (120, 40, 160)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


# --------------------------------------------------------------------------- cropping
def test_crop_around_box_centres_and_pads_white():
    img = np.full((20, 30, 3), 7, np.uint8)
    img[8:12, 10:14] = 200  # 4x4 "cell" at x 10..14, y 8..12
    crop = crop_around_box(img, (10, 8, 14, 12), scale=2.5)
    assert crop.shape == (10, 10, 3) and crop.dtype == np.uint8
    assert (crop[3:7, 3:7] == 200).all()  # cell in the centre
    edge = crop_around_box(img, (0, 0, 4, 4), scale=3)  # past the top-left corner
    assert edge.shape == (12, 12, 3)
    assert (edge[:4, :, :] == 255).all() and (edge[:, :4, :] == 255).all()
    assert (edge[4:, 4:] == 7).all()  # the part inside the image is copied
    with pytest.raises(ValueError, match="no area"):
        crop_around_box(img, (5, 5, 5, 9))


# --------------------------------------------------------------------------- LeukemiaAttri
def test_read_leukemia_attri_fixture():
    samples = read_leukemia_attri(FIXTURE / "annotations.json", FIXTURE, mpp=0.3)
    assert [s.sample_id for s in samples] == ["field_01#10", "field_01#11", "field_02#12"]
    a, b, c = samples
    assert a.cell_type == "myeloblast" and a.case == "AML"
    assert (
        a.attributes["leukemic_cell_size"] == "large" and a.attributes["nucleolus"] == "prominent"
    )
    assert a.attributes["cytoplasmic_vacuoles"] == "absent"
    # the job's crop: 36 µm at 0.3 µm/px = 120 px, resampled to 224, whatever the box size
    assert a.image.shape == b.image.shape == (224, 224, 3)
    assert (a.mpp, a.mpp_source) == (0.3, "given")
    old = read_leukemia_attri(FIXTURE / "annotations.json", FIXTURE, framing="box")
    assert old[0].image.shape == (50, 50, 3) and old[1].image.shape == (70, 70, 3)  # 2.5 x box
    assert old[0].mpp is None
    assert b.cell_type == "atypical lymphocyte" and b.case == "ALL"  # annotation overrides image
    assert b.attributes["cytoplasmic_vacuoles"] == "prominent"
    assert c.case == "CML" and c.attributes["leukemic_cell_size"] == "small"
    assert c.attributes["nuclear_shape"] is None and c.attributes["nucleolus"] is None
    for s in samples:
        p = parse_caption(s.caption)
        assert (p.cell_type, p.case, p.attributes) == (s.cell_type, s.case, s.attributes)
        assert set(s.attributes) == set(ATTRIBUTE_NAMES) and s.source == "leukemia_attri"
    assert load_dataset(FIXTURE / "annotations.json")[0].sample_id == "field_01#10"


def _coco(tmp_path: Path, **ann_changes) -> Path:
    doc = json.loads((FIXTURE / "annotations.json").read_text())
    doc["annotations"][0].update(ann_changes)
    for im in doc["images"]:
        shutil.copy(FIXTURE / im["file_name"], _dst(tmp_path, im["file_name"]))
    p = tmp_path / "coco.json"
    p.write_text(json.dumps(doc))
    return p


def _dst(root: Path, rel: str) -> Path:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    return root / rel


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bbox": [1, 2, 0, 5]}, r"annotation 10: bbox must be"),
        ({"nucleolus": "huge"}, r"annotation 10: attribute nucleolus: unknown value 'huge'"),
        ({"image_id": 99}, r"annotation 10: image_id 99 is not in 'images'"),
        ({"case": "MDS"}, r"annotation 10: unknown case 'MDS'"),
    ],
)
def test_read_leukemia_attri_bad_annotations(tmp_path, change, message):
    with pytest.raises(DatasetError, match=message):
        read_leukemia_attri(_coco(tmp_path, **change))


def test_read_leukemia_attri_missing_image_and_bad_json(tmp_path):
    p = _coco(tmp_path)
    (tmp_path / "images" / "field_02.png").unlink()
    with pytest.raises(DatasetError, match=r"annotation 12: .*field_02.png: image file not found"):
        read_leukemia_attri(p)
    with pytest.warns(UserWarning, match="skipped 1"):
        got = read_leukemia_attri(p, skip_missing=True)
    assert len(got) == 2 and "field_02.png" in got.skipped[0].reason
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"bad.json: not valid JSON"):
        read_leukemia_attri(tmp_path / "bad.json")


# --------------------------------------------------------------------------- WBCAtt
def _wbcatt_csv(tmp_path: Path, rows: list[dict], name: str = "pbc_attr_v1_train.csv") -> Path:
    cols = ["img_name", "label", *HEALTHY, "path"]
    p = tmp_path / name
    with p.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return p


ROW = {
    "img_name": "EO_1.jpg",
    "label": "Eosinophil",
    "cell_size": "small",
    "cell_shape": "round",
    "nucleus_shape": "segmented-bilobed",
    "nuclear_cytoplasmic_ratio": "low",
    "chromatin_density": "densely",
    "cytoplasm_vacuole": "no",
    "cytoplasm_texture": "clear",
    "cytoplasm_colour": "light blue",
    "granule_type": "round",
    "granule_colour": "red",
    "granularity": "yes",
    "path": "PBC/eosinophil/EO_1.jpg",
}


def test_read_wbcatt(tmp_path):
    _img(tmp_path / "PBC/eosinophil/EO_1.jpg", 40, 30)
    _img(tmp_path / "LY_2.jpg", 20, 20)  # found by name when 'path' does not exist
    row2 = dict(
        ROW,
        img_name="LY_2.jpg",
        label="Lymphocyte",
        granule_type="nil",
        granule_colour="nil",
        path="elsewhere/LY_2.jpg",
    )
    samples = read_wbcatt(_wbcatt_csv(tmp_path, [ROW, row2]), tmp_path, mpp=0.9)
    assert [s.sample_id for s in samples] == ["EO_1", "LY_2"]
    eo = samples[0]
    assert eo.split == "train" and eo.case == "healthy" and eo.cell_type == "eosinophil"
    # no box: PBC images are cell-centred, so the job's crop around the image centre (40 px
    # at 0.9 µm/px, mirrored past the 40x30 image) resampled to 224 px
    img = np.asarray(Image.open(tmp_path / "PBC/eosinophil/EO_1.jpg").convert("RGB"))
    assert np.array_equal(eo.image, cell_crop(img, (20, 15), 0.9, pad="reflect"))
    assert eo.caption.startswith(
        "This is an eosinophil from a healthy case, noted for its small size"
    )
    assert parse_caption(samples[1].caption).attributes["granule_type"] == "nil"


def test_read_wbcatt_errors(tmp_path):
    _img(tmp_path / "PBC/eosinophil/EO_1.jpg")
    missing = dict(ROW, img_name="NE_9.jpg", path="PBC/neutrophil/NE_9.jpg", label="Neutrophil")
    p = _wbcatt_csv(tmp_path, [ROW, missing])
    with pytest.raises(
        DatasetError, match=r"pbc_attr_v1_train.csv:3: .*NE_9.jpg: image file not found"
    ):
        read_wbcatt(p, tmp_path, mpp=0.5)
    with pytest.warns(UserWarning):
        got = read_wbcatt(p, tmp_path, skip_missing=True, mpp=0.5)
    assert len(got) == 1 and got.skipped[0].item.endswith("(NE_9.jpg)")
    bad = _wbcatt_csv(tmp_path, [dict(ROW, cell_shape="square")], "b.csv")
    with pytest.raises(
        DatasetError, match=r"b.csv:2: attribute cell_shape: unknown value 'square'"
    ):
        read_wbcatt(bad, tmp_path)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    bad = _wbcatt_csv(tmp_path, [dict(ROW, path="corrupt.jpg")], "c.csv")
    with pytest.raises(DatasetError, match=r"c.csv:2: .*corrupt.jpg: cannot decode image"):
        read_wbcatt(bad, tmp_path)
    (tmp_path / "d.csv").write_text("img_name,label\nx.jpg,Neutrophil\n")
    with pytest.raises(DatasetError, match=r"d.csv: not a WBCAtt CSV: missing column"):
        read_wbcatt(tmp_path / "d.csv", tmp_path)


# --------------------------------------------------------------------------- generic CSV
def test_generic_csv_caption_or_columns_and_box(tmp_path):
    _img(tmp_path / "a.png", 60, 40)
    _img(tmp_path / "b.png", 30, 30)
    (tmp_path / "g.csv").write_text(
        "image,x0,y0,x1,y1,mpp,caption,cell_type,case,cell_size,nucleolus,split\n"
        "a.png,20,10,40,30,0.6,,monocyte,AML,big,prominent,val\n"
        "b.png,,,,,,A lymphocyte with prominent nucleoli.,lymphocyte,,,,\n"
    )
    a, b = read_generic_csv(tmp_path / "g.csv")
    assert a.image.shape == (224, 224, 3) and a.split == "val" and a.case == "AML"
    assert (a.mpp, a.mpp_source) == (0.6, "given") and (b.mpp, b.mpp_source) == (None, None)
    assert (
        a.attributes["cell_size"] == "big"
        and parse_caption(a.caption).attributes["nucleolus"] == "prominent"
    )
    assert (
        b.image.shape == (30, 30, 3) and b.caption == "A lymphocyte with prominent nucleoli."
    )  # as given
    # columns are the truth when given: the caption's nucleolus is not copied into them
    assert b.attributes["nucleolus"] is None and b.cell_type == "lymphocyte"
    (tmp_path / "c.csv").write_text(
        "image,caption\nb.png,Eosinophil with bilobed nucleus from a case of CML.\n"
    )
    (c,) = read_generic_csv(tmp_path / "c.csv")
    assert (c.cell_type, c.case, c.attributes["nucleus_shape"]) == (
        "eosinophil",
        "CML",
        "segmented-bilobed",
    )
    # a column for one field only: the other fields still come from the caption
    (tmp_path / "c2.csv").write_text(
        "image,caption,cell_type\nb.png,Eosinophil with bilobed nucleus.,basophil\n"
    )
    (c2,) = read_generic_csv(tmp_path / "c2.csv")
    assert (c2.cell_type, c2.attributes["nucleus_shape"]) == ("basophil", "segmented-bilobed")
    (tmp_path / "d.csv").write_text("image,x0,y0,x1,y1,caption\na.png,5,5,5,9,x\n")
    with pytest.raises(DatasetError, match=r"d.csv:2: box .* has no area"):
        read_generic_csv(tmp_path / "d.csv")
    (tmp_path / "e.csv").write_text("image,x0,caption\na.png,5,x\n")
    with pytest.raises(DatasetError, match=r"e.csv: box needs all of x0, y0, x1, y1"):
        read_generic_csv(tmp_path / "e.csv")
    with pytest.raises(DatasetError, match=r"nope.csv: dataset file not found"):
        load_dataset(tmp_path / "nope.csv")


def test_write_then_read_generic_csv_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    samples = [
        CaptionSample(
            rng.integers(0, 255, (24, 24, 3), dtype=np.uint8),
            "This is a basophil.",
            "basophil",
            None,
            {},
            "x1",
            "demo",
            "train",
        ),
        CaptionSample(
            rng.integers(0, 255, (24, 24, 3), dtype=np.uint8),
            "Myeloblast observed in a case of acute myeloid leukemia. Notable features include large size.",
            "myeloblast",
            "AML",
            {"leukemic_cell_size": "large"},
            "x2",
            "demo",
            None,
        ),
    ]
    csv_path = write_generic_csv(samples, tmp_path / "out")
    back = load_dataset(tmp_path / "out")  # a directory with samples.csv
    assert len(back) == 2
    for s, r in zip(samples, back):
        assert np.array_equal(s.image, r.image)
        assert (s.caption, s.cell_type, s.case, s.attributes, s.sample_id, s.source, s.split) == (
            r.caption,
            r.cell_type,
            r.case,
            r.attributes,
            r.sample_id,
            r.source,
            r.split,
        )
    assert csv_path.name == "samples.csv"


# --------------------------------------------------------------------------- splits
def _sample(i: int, ct: str, split=None) -> CaptionSample:
    return CaptionSample(np.zeros((2, 2, 3), np.uint8), "", ct, None, {}, f"s{i}", "t", split)


def test_split_samples_deterministic_stratified_and_keeps_own_split():
    samples = [_sample(i, ct) for i, ct in enumerate(["neutrophil"] * 50 + ["basophil"] * 10)]
    samples += [_sample(100, "monocyte", "test"), _sample(101, "monocyte", "val")]
    a = split_samples(samples, 0.2, seed=3)
    b = split_samples(list(reversed(samples)), 0.2, seed=3)
    assert [s.sample_id for s in a["val"]] == [s.sample_id for s in b["val"]]
    assert Counter(s.cell_type for s in a["val"]) == {
        "neutrophil": 10,
        "basophil": 2,
        "monocyte": 1,
    }
    assert [s.sample_id for s in a["test"]] == ["s100"]
    assert all(s.split == name for name, lst in a.items() for s in lst)
    assert samples[0].split is None  # inputs untouched
    c = split_samples(samples, 0.2, seed=4)
    assert {s.sample_id for s in c["val"]} != {s.sample_id for s in a["val"]}
    with pytest.raises(ValueError, match="val_fraction"):
        split_samples(samples, 1.5)


# --------------------------------------------------------------------------- demo dataset
def _mini_shared(shared: Path, dst: Path) -> Path:
    """A few real files of the shared folder, laid out the same way."""
    rows = list(csv.DictReader((shared / "txl_pbc/pbc_wbcatt.csv").open()))
    pick = rows[:3] + [r for r in rows if r["n_wbc_boxes"] == "2"][:1]
    (dst / "txl_pbc").mkdir(parents=True)
    with (dst / "txl_pbc/pbc_wbcatt.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(pick)
    for r in pick:
        rel = Path(*Path(r["image"]).parts[1:])
        shutil.copy(shared / "txl_pbc" / rel, _dst(dst / "txl_pbc", str(rel)))
        lab = Path("labels") / rel.parts[1] / (rel.stem + ".txt")
        shutil.copy(shared / "txl_pbc" / lab, _dst(dst / "txl_pbc", str(lab)))
    types = (shared / "bccd/wbc_types.csv").read_text().splitlines()
    (dst / "bccd").mkdir()

    def has_image(i: str) -> bool:
        return (shared / f"bccd/JPEGImages/BloodImage_{int(i):05d}.jpg").exists()

    body = [ln.split(",") for ln in types[1:] if ln.strip()]
    typed = [f[1] for f in body if len(f) == 3 and f[2].strip() and has_image(f[1])][:2]
    untyped = next(f[1] for f in body if len(f) == 3 and not f[2].strip() and has_image(f[1]))
    absent = next(f[1] for f in body if len(f) == 3 and f[2].strip() and not has_image(f[1]))
    keep = [types[0]] + [",".join(f) for f in body if f[1] in (*typed, untyped, absent)]
    (dst / "bccd/wbc_types.csv").write_text("\n".join(keep) + "\n")
    for i in (*typed, untyped):
        for sub, ext in (("Annotations", "xml"), ("JPEGImages", "jpg")):
            name = f"{sub}/BloodImage_{int(i):05d}.{ext}"
            shutil.copy(shared / "bccd" / name, _dst(dst / "bccd", name))
    seg = dst / "segmentation_wbc/dataset2"
    seg.mkdir(parents=True)
    (seg / "labels.csv").write_text("image ID,class\n1,2\n3,1\n")
    for n in ("001", "001_mask", "003", "003_mask"):
        shutil.copy(shared / f"segmentation_wbc/dataset2/{n}.png", seg / f"{n}.png")
    return dst


def test_build_demo_dataset_on_a_few_real_files(shared_data, tmp_path):
    root = _mini_shared(shared_data, tmp_path / "shared")
    ds = build_demo_dataset(root, crop_px=64)
    by_source = Counter(s.source for s in ds)
    assert by_source == {"pbc_wbcatt": 4, "segmentation_wbc": 2, "bccd": 2}
    assert all(s.image.shape == (64, 64, 3) for s in ds)
    pbc = [s for s in ds if s.source == "pbc_wbcatt"]
    assert all(s.split in ("train", "val", "test") and s.case == "healthy" for s in pbc)
    assert all(parse_caption(s.caption).attributes == s.attributes for s in pbc)
    assert {s.caption for s in ds if s.source == "segmentation_wbc"} == {
        "This is a lymphocyte.",
        "This is a neutrophil.",
    }
    reasons = sorted(k.reason for k in ds.skipped)
    assert reasons == ["image or annotation file not in the dataset", "no WBC type given"]

    from hemblip.__main__ import main

    out = tmp_path / "demo"
    assert (
        main(["build-demo-data", "--shared", str(root), "--out", str(out), "--crop-px", "64"]) == 0
    )
    back = read_generic_csv(out / "samples.csv")
    assert Counter(s.source for s in back) == by_source
    assert all(s.split is not None for s in back)
    assert (out / "skipped.tsv").read_text().count("\n") == 3


def test_build_demo_dataset_full_composition(shared_data):
    ds = build_demo_dataset(shared_data, crop_px=32)
    counts = Counter(s.source for s in ds)
    assert counts["pbc_wbcatt"] == 450
    assert Counter(s.split for s in ds if s.source == "pbc_wbcatt") == {
        "train": 285,
        "test": 120,
        "val": 45,
    }
    assert Counter(s.cell_type for s in ds if s.source == "pbc_wbcatt") == {
        ct: 90 for ct in ("neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte")
    }
    assert counts["segmentation_wbc"] == 400
    assert counts["bccd"] == 316
    reasons = Counter(re.sub(r" (\(|in BloodImage).*", "", k.reason) for k in ds.skipped)
    assert reasons == {
        "no WBC type given": 44,
        "image or annotation file not in the dataset": 30,
        "several WBCs": 15,
        "no WBC box": 5,
        "2 WBC boxes": 1,
    }


# --------------------------------------------------------------------------- physical crops
def test_physical_crop_scale_order_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 200, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "t.tif", resolution=10000.0 / 0.4, resolution_unit="cm")
    Image.fromarray(rgb).save(tmp_path / "p.png")
    (tmp_path / "g.csv").write_text(
        "image,x0,y0,x1,y1,mpp,cell_type\n"
        "t.tif,2,2,12,12,0.9,neutrophil\n"  # the TIFF tags win over the column (the job's order)
        "p.png,2,2,12,12,0.9,neutrophil\n"
    )
    t, p = read_generic_csv(tmp_path / "g.csv")
    assert (t.mpp, t.mpp_source) == (0.4, "metadata") and (p.mpp, p.mpp_source) == (0.9, "given")
    assert np.array_equal(t.image, cell_crop(rgb, (7, 7), 0.4, pad="reflect"))
    assert (
        not (t.image == 255).all(axis=-1).any()
    )  # past the border: mirrored smear, not white glass
    # no tags, no mpp, no red cells: a one-line error naming the row, or a recorded skip
    Image.fromarray(np.full((60, 80, 3), 238, np.uint8)).save(tmp_path / "blank.png")
    (tmp_path / "n.csv").write_text("image,x0,y0,x1,y1,cell_type\nblank.png,2,2,12,12,neutrophil\n")
    with pytest.raises(DatasetError, match=r"n.csv:2: .*blank.png: no scale for the image") as info:
        read_generic_csv(tmp_path / "n.csv")
    assert "\n" not in str(info.value)
    with pytest.warns(UserWarning, match="skipped 1"):
        got = read_generic_csv(tmp_path / "n.csv", skip_missing=True)
    assert len(got) == 0 and "no scale" in got.skipped[0].reason
    for bad in ("0", "nan", "-1", "1e9", "abc", "inf"):
        (tmp_path / "b.csv").write_text(
            f"image,x0,y0,x1,y1,mpp,cell_type\np.png,2,2,12,12,{bad},neutrophil\n"
        )
        with pytest.raises(DatasetError, match=r"b.csv:2: mpp must be µm/px"):
            read_generic_csv(tmp_path / "b.csv")
    with pytest.raises(ValueError, match="framing"):
        read_generic_csv(tmp_path / "g.csv", framing="2.5x")
    # the scale a crop was cut at survives a write/read round trip
    back = read_generic_csv(write_generic_csv([t, p], tmp_path / "out"))
    assert [(s.mpp, s.mpp_source) for s in back] == [(0.4, "metadata"), (0.9, "given")]
    assert all(np.array_equal(a.image, b.image) for a, b in zip([t, p], back))


def test_demo_dataset_records_each_crops_scale(shared_data, tmp_path):
    root = _mini_shared(shared_data, tmp_path / "shared")
    ds = build_demo_dataset(root)
    assert all(s.image.shape == (224, 224, 3) for s in ds)
    by = {(s.source, s.mpp_source) for s in ds}
    # One scale per instrument, as the job reads one per slide (never a per-image estimate).
    assert by == {("pbc_wbcatt", "dataset"), ("bccd", "dataset"), ("segmentation_wbc", "dataset")}
    assert all(s.mpp == PBC_MPP for s in ds if s.source == "pbc_wbcatt")
    assert all(s.mpp == BCCD_MPP for s in ds if s.source == "bccd")
    assert all(s.mpp == 0.115 for s in ds if s.source == "segmentation_wbc")


def test_dataset_scales_are_what_the_end_to_end_slides_carry(shared_data):
    """The readers' PBC/BCCD scales are the ones eval-slides writes into its slides' metadata
    (median red-cell estimate of each source), so a cell is cut at the same scale both ways."""
    from pipeline.eval_slides import source_scales

    scales = source_scales(shared_data)
    assert abs(scales["pbc"]["mpp"] - PBC_MPP) < 0.002
    assert abs(scales["bccd"]["mpp"] - BCCD_MPP) < 0.002


def test_one_reader_per_dataset_and_the_old_module_still_works(shared_data, tmp_path):
    """hemblip.datasets has a reader per dataset; the demo dataset is exactly their union, and
    hemblip.data (the old module) re-exports the same objects."""
    import hemblip.data as old
    import hemblip.datasets as new
    from hemblip.datasets import read_bccd, read_segmentation_wbc

    assert all(getattr(old, n) is getattr(new, n) for n in old.__all__)
    root = _mini_shared(shared_data, tmp_path / "shared")
    demo = build_demo_dataset(root, crop_px=64)
    for source, reader in (("bccd", read_bccd), ("segmentation_wbc", read_segmentation_wbc)):
        part = reader(root / source, crop_px=64)
        mine = [s for s in demo if s.source == source]
        assert [s.sample_id for s in part] == [s.sample_id for s in mine]
        assert all(np.array_equal(a.image, b.image) for a, b in zip(part, mine))
    bccd = read_bccd(root / "bccd")
    assert {k.reason for k in bccd.skipped} >= {
        "no WBC type given",
        "image or annotation file not in the dataset",
    }
    assert [(k.item, k.reason) for k in bccd.skipped] == [
        (k.item, k.reason) for k in demo.skipped if "wbc_types.csv" in k.item
    ]
    # load_dataset passes the crop on to the demo dataset (hemblip.train's wider context crops)
    wide = load_dataset(root, crop_px=96, crop_um=72.0)
    assert [s.sample_id for s in wide] == [s.sample_id for s in demo]
    assert all(s.image.shape == (96, 96, 3) for s in wide)
