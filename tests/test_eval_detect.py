"""Detection evaluation: the one-to-one centroid-in-box rule, label readers, bad files, the CLI."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.eval_detect import (
    evaluate_detection,
    match_detections,
    prf,
    read_labels,
    read_source_map,
)

pytestmark = pytest.mark.unit


def test_two_detections_in_one_box_match_once():
    m = match_detections([(5, 5), (6, 6)], [(0, 0, 10, 10)])
    assert len(m) == 1
    assert m[0][1] == 0


def test_one_detection_in_two_overlapping_boxes_matches_once():
    m = match_detections([(5, 5)], [(0, 0, 10, 10), (4, 4, 14, 14)])
    assert len(m) == 1


def test_matching_is_maximal_not_greedy():
    # detection 0 lies in both boxes, detection 1 only in box 0: a greedy rule that gives box 0
    # to detection 0 would lose a match
    boxes = [(0, 0, 10, 10), (4, 0, 20, 10)]
    m = match_detections([(5, 5), (2, 5)], boxes)
    assert sorted(m) == [(0, 1), (1, 0)]


def test_outside_every_box_no_match_and_edges_inclusive():
    assert match_detections([(11, 5)], [(0, 0, 10, 10)]) == []
    assert match_detections([(10, 10)], [(0, 0, 10, 10)]) == [(0, 0)]
    assert match_detections([], [(0, 0, 1, 1)]) == []
    assert match_detections([(1, 1)], []) == []


def test_prf():
    r = prf(8, 2, 0)
    assert r["precision"] == pytest.approx(0.8)
    assert r["recall"] == 1.0
    assert r["f1"] == pytest.approx(2 * 0.8 / 1.8)
    assert math.isnan(prf(0, 0, 0)["precision"])


def _voc(path, boxes, extra="RBC"):
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in [("WBC", b) for b in boxes] + [(extra, (1, 1, 5, 5))]
    )
    path.write_text(f"<annotation>{objs}</annotation>")


def test_label_readers(tmp_path):
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.05 0.05\n\n")
    assert read_labels(tmp_path, "a", 100, 50) == [pytest.approx((40, 15, 60, 35))]
    _voc(tmp_path / "b.xml", [(10, 20, 30, 40)])
    assert read_labels(tmp_path, "b", 100, 100) == [(10, 20, 30, 40)]
    assert read_labels(tmp_path, "missing", 10, 10) is None
    (tmp_path / "c.txt").write_text("0 0.5 0.5\n")
    with pytest.raises(ConfigError, match="c.txt"):
        read_labels(tmp_path, "c", 10, 10)


def test_source_map(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("uuid,source\nabc,pbc\ndef,bccd\n")
    assert read_source_map(p) == {"abc": "pbc", "def": "bccd"}
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ConfigError, match="source-map"):
        read_source_map(tmp_path / "bad.csv")


def _field(mpp, cells):
    """Glass with red cells and the given white-cell centres (px); returns rgb, truth boxes."""
    px = 1 / mpp
    img = np.zeros((400, 400, 3), np.uint8)
    img[:] = (236, 226, 222)
    rng = np.random.default_rng(1)
    placed = [(x, y, 6 * px) for x, y in cells]
    for _ in range(500):
        x, y = rng.uniform(0, 400, 2)
        if all(math.hypot(x - a, y - b) > 3.75 * px + r + 4 for a, b, r in placed):
            placed.append((x, y, 3.75 * px))
            cv2.circle(img, (int(x), int(y)), int(3.75 * px), (214, 148, 158), -1)
    boxes = []
    for x, y in cells:
        cv2.circle(img, (int(x), int(y)), int(6 * px), (205, 192, 222), -1)
        cv2.circle(img, (int(x), int(y)), int(3.6 * px), (92, 48, 138), -1)
        boxes.append((x - 6 * px, y - 6 * px, x + 6 * px, y + 6 * px))
    return cv2.GaussianBlur(img, (0, 0), 1.0), boxes


def _write_set(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    # a: two white cells, YOLO; b: one white cell, VOC; a ghost label box with no cell in c
    for name, cells, fmt in (
        ("a", [(100, 100), (280, 300)], "yolo"),
        ("b", [(200, 200)], "voc"),
        ("c", [(120, 300)], "yolo"),
    ):
        rgb, boxes = _field(0.25, cells)
        cv2.imwrite(str(images / f"{name}.png"), rgb[:, :, ::-1])
        if name == "c":
            boxes = [*boxes, (300, 40, 360, 100)]  # nothing there: a miss
        if fmt == "yolo":
            (labels / f"{name}.txt").write_text(
                "".join(
                    f"0 {(b[0] + b[2]) / 800} {(b[1] + b[3]) / 800} {(b[2] - b[0]) / 400} {(b[3] - b[1]) / 400}\n"
                    for b in boxes
                )
            )
        else:
            _voc(labels / f"{name}.xml", [tuple(int(v) for v in b) for b in boxes])
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "empty.png").write_bytes(b"")
    rgb, _ = _field(0.25, [(200, 200)])
    cv2.imwrite(str(images / "nolabel.png"), rgb[:, :, ::-1])
    (images / "notes.txt").write_text("not an image suffix: ignored")
    smap = tmp_path / "map.csv"
    smap.write_text("uuid,source\na,s1\nb,s2\nc,s1\n")
    return images, labels, smap


def test_evaluate_detection_counts_and_records_bad_files(tmp_path):
    images, labels, smap = _write_set(tmp_path)
    res = evaluate_detection(images, labels, source_map=smap)  # mpp estimated per image
    o = res["overall"]
    assert (o["tp"], o["fp"], o["fn"]) == (4, 0, 1)
    assert o["recall"] == pytest.approx(0.8) and o["precision"] == 1.0
    assert res["per_source"]["s1"]["tp"] == 3 and res["per_source"]["s1"]["fn"] == 1
    assert res["per_source"]["s2"]["tp"] == 1
    reasons = {e["image"].rsplit("/", 1)[-1]: e["reason"] for e in res["errors"]}
    assert set(reasons) == {"broken.jpg", "empty.png", "nolabel.png"}
    assert "unreadable" in reasons["broken.jpg"] and "empty" in reasons["empty.png"]
    assert "no label file" in reasons["nolabel.png"]
    assert all(r["mpp_source"] == "estimated" for r in res["images"])
    assert all(r["mpp"] == pytest.approx(0.25, rel=0.25) for r in res["images"])
    given = evaluate_detection(images, labels, source_map=smap, mpp=0.25)
    assert all(r["mpp"] == 0.25 and r["mpp_source"] == "given" for r in given["images"])


def test_evaluate_detection_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="--images"):
        evaluate_detection(tmp_path / "nope", tmp_path)
    with pytest.raises(ConfigError, match="--mpp"):
        evaluate_detection(tmp_path, tmp_path, mpp=-1)


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    from pipeline.__main__ import main

    images, labels, smap = _write_set(tmp_path)
    out = tmp_path / "r.json"
    rc = main(
        [
            "eval-detect",
            "--images",
            str(images),
            "--labels",
            str(labels),
            "--source-map",
            str(smap),
            "--json",
            str(out),
            "--mpp",
            "0.25",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "overall" in text and "s1" in text and "broken.jpg" in text
    data = json.loads(out.read_text())
    assert data["overall"]["tp"] == 4
    rc = main(["eval-detect", "--images", str(tmp_path / "missing"), "--labels", str(labels)])
    assert rc == 2


# -- detection on a coarser copy (--detect-mpp), as on a coarser pyramid level


def test_detect_at_maps_coarse_detections_back():
    from pipeline.detection import detect_wbc
    from pipeline.eval_detect import detect_at

    cells = [(100, 100), (280, 300), (300, 90)]
    rgb, boxes = _field(0.25, cells)
    fine = detect_wbc(rgb, 0.25)
    assert detect_at(rgb, 0.25, None) == fine  # None: today's behaviour, unchanged
    coarse = detect_at(rgb, 0.25, 1.0)  # the image is 100 px wide at 1.0 µm/px
    assert len(coarse) == len(fine) == 3
    for d, f, (x, y), b in zip(
        coarse,
        fine,
        sorted(cells, key=lambda c: (c[1], c[0])),
        sorted(boxes, key=lambda b: (b[1], b[0])),
        strict=True,
    ):
        # centroid back in px of rgb: within 1 µm (4 px) of the cell's centre and the fine one
        assert math.hypot(d.centroid[0] - x, d.centroid[1] - y) <= 4.0
        assert math.hypot(d.centroid[0] - f.centroid[0], d.centroid[1] - f.centroid[1]) <= 4.0
        x0, y0, x1, y1 = d.bbox
        assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 400
        assert x0 <= x <= x1 and y0 <= y <= y1
        # box and area in rgb px, like the fine detection's (a 12 µm cell is 48 px across here)
        assert all(abs(a - c) <= 8 for a, c in zip(d.bbox, f.bbox, strict=True))
        assert d.area_px == pytest.approx(f.area_px, rel=0.2)
        assert x1 - x0 == pytest.approx(b[2] - b[0], abs=10)


def test_detect_at_leaves_coarser_images_alone_and_jpeg_reencodes():
    from pipeline.detection import detect_wbc
    from pipeline.eval_detect import detect_at

    rgb, _ = _field(1.0, [(200, 200)])
    assert detect_at(rgb, 1.0, 0.5) == detect_wbc(rgb, 1.0)
    assert detect_at(rgb, 1.0, 1.0) == detect_wbc(rgb, 1.0)
    fine, _ = _field(0.25, [(200, 200)])
    dets = detect_at(fine, 0.25, 1.0)
    assert (
        len(dets) == 1 and math.hypot(dets[0].centroid[0] - 200, dets[0].centroid[1] - 200) <= 4.0
    )
    # --detect-jpeg re-encodes the reduced image (4:2:0 JPEG) before detection
    small = cv2.resize(fine, (100, 100), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", small[:, :, ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, 90])
    want = detect_wbc(cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1].copy(), 1.0)
    got = detect_at(fine, 0.25, 1.0, jpeg_quality=90)
    assert [d.score for d in got] == [d.score for d in want]
    assert [d.centroid for d in got] == [
        ((d.centroid[0] + 0.5) * 4 - 0.5, (d.centroid[1] + 0.5) * 4 - 0.5) for d in want
    ]


def test_evaluate_detection_at_a_coarser_mpp(tmp_path):
    images, labels, smap = _write_set(tmp_path)
    base = evaluate_detection(images, labels, source_map=smap, mpp=0.25)
    same = evaluate_detection(images, labels, source_map=smap, mpp=0.25, detect_mpp=None)
    assert same["overall"] == base["overall"] and same["images"] == base["images"]
    assert base["detect_mpp"] is None and all(r["detect_mpp"] == 0.25 for r in base["images"])
    coarse = evaluate_detection(images, labels, source_map=smap, mpp=0.25, detect_mpp=1.0)
    o = coarse["overall"]
    assert (o["tp"], o["fp"], o["fn"]) == (4, 0, 1)
    assert coarse["detect_mpp"] == 1.0 and all(r["detect_mpp"] == 1.0 for r in coarse["images"])
    # an image already coarser than --detect-mpp is used as it is
    fine_only = evaluate_detection(images, labels, source_map=smap, mpp=0.25, detect_mpp=0.1)
    assert fine_only["overall"] == base["overall"]
    assert all(r["detect_mpp"] == 0.25 for r in fine_only["images"])
    for bad in (0, -1, float("nan"), 6.0, True):
        with pytest.raises(ConfigError, match="--detect-mpp"):
            evaluate_detection(images, labels, detect_mpp=bad)
    with pytest.raises(ConfigError, match="--detect-jpeg"):
        evaluate_detection(images, labels, jpeg_quality=0)


def test_cli_detect_mpp(tmp_path, capsys):
    from pipeline.__main__ import main

    images, labels, smap = _write_set(tmp_path)
    out = tmp_path / "r.json"
    rc = main(
        [
            "eval-detect",
            "--images",
            str(images),
            "--labels",
            str(labels),
            "--mpp",
            "0.25",
            "--detect-mpp",
            "1.0",
            "--detect-jpeg",
            "90",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "detection at 1.0 µm/px" in text and "JPEG quality 90" in text
    data = json.loads(out.read_text())
    assert data["detect_mpp"] == 1.0 and data["jpeg_quality"] == 90
    api = evaluate_detection(images, labels, mpp=0.25, detect_mpp=1.0, jpeg_quality=90)
    assert data["overall"] == json.loads(json.dumps(api["overall"], default=float))
    assert (
        main(
            ["eval-detect", "--images", str(images), "--labels", str(labels), "--detect-mpp", "-1"]
        )
        == 2
    )
    assert "--detect-mpp" in capsys.readouterr().err
