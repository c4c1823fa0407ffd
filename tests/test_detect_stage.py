"""Detection stage on real pixels: generated sample slides and real BCCD fields."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from hemblip.crops import MAX_CENTRE_SHIFT_UM
from pipeline.detect import DetectConfig, SlideCells, detect_slide
from pipeline.detection import DetectorConfig
from pipeline.errors import ConfigError
from pipeline.samples import SAMPLE_DATA_DIR, build_sample_slides, read_voc_boxes
from pipeline.schema import DETECT_COLUMNS, DETECT_SCHEMA, QC_FLAGS
from pipeline.slides import _openslide

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::FutureWarning")]

FIELD = SAMPLE_DATA_DIR / "bccd" / "JPEGImages" / "BloodImage_00000.jpg"
FIELD_WBC = read_voc_boxes(SAMPLE_DATA_DIR / "bccd" / "Annotations" / "BloodImage_00000.xml")[0]
BCCD_MPP = 0.072


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return build_sample_slides(tmp_path_factory.mktemp("samples"))


@pytest.fixture(scope="module")
def svs_cells(samples):
    svs = next(s for s in samples if s.format == "openslide:aperio")
    return svs, detect_slide(svs.path, DetectConfig(), source="s3://bucket/sample.svs")


def _matches(records, boxes):
    """Number of detections whose centroid lies inside each ground-truth box."""
    return [
        sum(1 for r in records if b[0] <= r["centroid_x"] < b[2] and b[1] <= r["centroid_y"] < b[3])
        for b in boxes
    ]


def _field(tmp_path, rgb=None, name="field.png"):
    rgb = np.asarray(Image.open(FIELD).convert("RGB")) if rgb is None else rgb
    p = tmp_path / name
    Image.fromarray(rgb).save(p)
    return p


def test_records_crops_info_overview(svs_cells):
    svs, res = svs_cells
    assert isinstance(res, SlideCells)
    names = [c[0] for c in DETECT_COLUMNS]
    assert len(res.records) >= 10
    for i, r in enumerate(res.records):
        assert list(r) == names
        assert r["cell_index"] == i and r["source"] == "s3://bucket/sample.svs"
        assert r["mpp_source"] == "metadata" and r["mpp"] == pytest.approx(BCCD_MPP)
        assert r["crop_size_um"] == 36.0
        assert (
            r["bbox_x0"] < r["centroid_x"] < r["bbox_x1"]
            and r["bbox_y0"] < r["centroid_y"] < r["bbox_y1"]
        )
        assert set(r["qc_flags"]) <= set(QC_FLAGS)
        assert 5 < r["cell_diameter_um"] < 40
    ys = [r["centroid_y"] for r in res.records]
    assert ys == sorted(ys)  # reading order
    assert res.crops.shape == (len(res.records), 224, 224, 3) and res.crops.dtype == np.uint8
    info = res.info
    assert (info["width"], info["height"]) == (2800, 2160)
    assert info["format"] == "openslide:aperio" and info["level_count"] == 4
    assert info["detect_level"] > 0  # detection never ran on the full-resolution level
    assert info["detect_mpp"] == pytest.approx(BCCD_MPP * 8)
    assert (
        res.overview.ndim == 3
        and max(res.overview.shape[:2]) <= 1024
        and res.overview.dtype == np.uint8
    )
    # Records convert to the Arrow schema without loss.
    import pyarrow as pa

    assert pa.Table.from_pylist(res.records, schema=DETECT_SCHEMA).num_rows == len(res.records)


def test_detections_match_ground_truth_once_each(svs_cells):
    svs, res = svs_cells
    truth = json.loads(svs.truth_path.read_text())["wbc_boxes"]
    m = _matches(res.records, truth)
    assert max(m) == 1  # never two detections in one ground-truth cell
    assert sum(m) >= 0.75 * len(truth)


def test_crop_is_centred_on_the_cell_at_full_resolution(svs_cells):
    _, res = svs_cells
    crop = res.crops[len(res.records) // 2]
    # The cell (nucleus is the darkest stain) sits in the middle of its crop.
    dark = crop.astype(int).sum(-1) < np.percentile(crop.astype(int).sum(-1), 10)
    yy, xx = np.nonzero(dark)
    assert abs(xx.mean() - 112) < 40 and abs(yy.mean() - 112) < 40
    assert crop.std() > 10


def test_tiling_keeps_each_cell_once(samples, svs_cells):
    svs, whole = svs_cells
    tiled = detect_slide(svs.path, DetectConfig(tile_px=200))
    assert tiled.info["tiles"] >= 6
    truth = json.loads(svs.truth_path.read_text())["wbc_boxes"]
    assert max(_matches(tiled.records, truth)) == 1  # no cell twice across tile borders
    # Cells found on one tile are found, at the same level-0 place, with tiles (the detector
    # sees less context on a 115-µm tile, so allow it to miss one).
    found = [
        any(
            abs(r["centroid_x"] - t["centroid_x"]) < 40
            and abs(r["centroid_y"] - t["centroid_y"]) < 40
            for t in tiled.records
        )
        for r in whole.records
    ]
    assert sum(found) >= len(found) - 1


def test_level0_is_read_only_for_crops(samples, monkeypatch):
    slide = samples[0]
    reads = []
    real = _openslide.OpenSlideSlide._read

    def spy(self, level, x0, y0, x1, y1):
        reads.append((level, (x1 - x0) * (y1 - y0)))
        return real(self, level, x0, y0, x1, y1)

    monkeypatch.setattr(_openslide.OpenSlideSlide, "_read", spy)
    res = detect_slide(slide.path)
    n = len(res.records)
    # the crop plus the margin its centre may move onto the nucleus (hemblip.crops.centre_offset)
    side = round(36.0 / BCCD_MPP) + 2 * (math.ceil(MAX_CENTRE_SHIFT_UM / BCCD_MPP) + 1)
    level0 = [px for lv, px in reads if lv == 0]
    assert len(level0) == n  # one read per crop, nothing else at full resolution
    assert sum(level0) <= n * side * side
    assert sum(px for lv, px in reads if lv == res.info["detect_level"]) == 350 * 270


def test_plain_image_user_and_estimated_mpp(tmp_path):
    p = _field(tmp_path)
    user = detect_slide(p, DetectConfig(mpp=BCCD_MPP))
    assert user.info["mpp_source"] == "user" and user.info["format"] == "image:png"
    assert user.info["level_count"] == 1 and user.info["detect_level"] == 0
    assert _matches(user.records, [FIELD_WBC]) == [1]
    est = detect_slide(p)
    assert est.info["mpp_source"] == "estimated"
    assert est.records[0]["mpp_source"] == "estimated"
    assert 0.5 * BCCD_MPP < est.info["mpp"] < 1.6 * BCCD_MPP


def test_large_plain_image_overview_is_bounded(tmp_path):
    rgb = np.asarray(Image.open(FIELD).convert("RGB"))
    big = np.tile(rgb, (2, 2, 1))  # 1280 x 960
    res = detect_slide(_field(tmp_path, big, "mosaic.png"), DetectConfig(mpp=BCCD_MPP))
    assert res.overview.shape == (768, 1024, 3)
    small = np.asarray(Image.fromarray(big).resize((1024, 768), Image.BILINEAR)).astype(int)
    assert np.abs(res.overview.astype(int) - small).mean() < 12
    assert len(res.records) == 4


def test_qc_slide_edge_and_crop_incomplete(tmp_path):
    rgb = np.asarray(Image.open(FIELD).convert("RGB"))
    cut = np.ascontiguousarray(rgb[:, 300:])  # the WBC (x 259..491) now touches the left border
    res = detect_slide(_field(tmp_path, cut), DetectConfig(mpp=BCCD_MPP))
    assert len(res.records) == 1
    assert {"slide_edge", "crop_incomplete"} <= set(res.records[0]["qc_flags"])
    # The padded part of the crop is white.
    assert (res.crops[0][:, :5] == 255).all()


def test_qc_clumped_when_boxes_overlap(tmp_path):
    rgb = np.asarray(Image.open(FIELD).convert("RGB"))
    can = np.empty((700, 900, 3), np.uint8)
    can[:] = (235, 225, 220)
    can[:480, :640] = rgb
    x0, y0, x1, y1 = FIELD_WBC
    can[y0 + 180 : y1 + 180, x0 + 200 : x1 + 200] = rgb[
        y0:y1, x0:x1
    ]  # a second WBC, corners overlapping
    res = detect_slide(_field(tmp_path, can), DetectConfig(mpp=BCCD_MPP))
    assert len(res.records) == 2
    assert all("clumped" in r["qc_flags"] for r in res.records)


def test_qc_thresholds_come_from_the_detector_config(tmp_path):
    p = _field(tmp_path)
    base = detect_slide(p, DetectConfig(mpp=BCCD_MPP)).records
    assert (
        base
        and "out_of_focus" not in base[0]["qc_flags"]
        and "implausible_size" not in base[0]["qc_flags"]
    )
    strict = DetectorConfig(min_focus=1e9, min_cell_diameter_um=2.0, max_cell_diameter_um=8.0)
    flagged = detect_slide(p, DetectConfig(mpp=BCCD_MPP, detector=strict)).records
    assert len(flagged) == len(base)  # flagged, never dropped
    assert {"out_of_focus", "implausible_size"} <= set(flagged[0]["qc_flags"])


def test_crop_size_and_pixels_are_configurable(tmp_path):
    p = _field(tmp_path)
    res = detect_slide(p, DetectConfig(mpp=BCCD_MPP, crop_um=20.0, crop_px=96))
    assert res.crops.shape[1:] == (96, 96, 3)
    assert res.records[0]["crop_size_um"] == 20.0


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"crop_um": 0}, "--crop-um"),
        ({"crop_px": 4}, "--crop-px"),
        ({"mpp": -0.1}, "--mpp"),
        ({"tile_px": 16}, "--tile-px"),
        ({"overlap_px": 900}, "--overlap-px"),
        ({"detector": "fast"}, "detector"),
        ({"max_detect_pixels": 0}, "max_detect_pixels"),
    ],
)
def test_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        DetectConfig(**kwargs)


def test_pyramid_without_mpp_is_estimated_from_level0_windows(tmp_path):
    import tifffile

    # Four different fields, 2 x 2, tiled 2 x 2 (2560 x 1920: wider than one estimation window).
    # One field repeated 16x gives the estimator a single field's red cells to judge from.
    fields = sorted((SAMPLE_DATA_DIR / "bccd" / "JPEGImages").glob("*.jpg"))[:4]
    f = [np.asarray(Image.open(x).convert("RGB")) for x in fields]
    base = np.tile(
        np.concatenate([np.concatenate(f[:2], axis=1), np.concatenate(f[2:], axis=1)]), (2, 2, 1)
    )
    p = tmp_path / "noscale.tiff"
    with tifffile.TiffWriter(p) as tw:
        for i in range(3):
            tw.write(
                np.ascontiguousarray(base[:: 2**i, :: 2**i]),
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                metadata=None,
                subfiletype=int(i > 0),
            )
    res = detect_slide(p)
    assert res.info["format"] == "openslide:generic-tiff" and res.info["mpp_source"] == "estimated"
    assert 0.5 * BCCD_MPP < res.info["mpp"] < 1.6 * BCCD_MPP
    assert res.records and all(r["mpp_source"] == "estimated" for r in res.records)
    # The estimate only sets the scale: given as --mpp, it yields the same cells.
    user = detect_slide(p, DetectConfig(mpp=res.info["mpp"]))
    assert [(r["bbox_x0"], r["bbox_y0"]) for r in user.records] == [
        (r["bbox_x0"], r["bbox_y0"]) for r in res.records
    ]


def test_tiny_real_fixtures_run_without_cells(shared_data):
    for name in ("small.svs", "boxes_0.dcm"):
        res = detect_slide(shared_data / "openslide_fixtures" / name)
        assert res.records == [] and res.crops.shape == (0, 224, 224, 3)
        assert res.info["mpp_source"] == "metadata" and res.overview.shape == (16, 16, 3)


def test_an_open_slide_is_borrowed_not_closed(samples, svs_cells):
    from pipeline.slides import open_slide

    svs, whole = svs_cells
    with open_slide(svs.path) as s:
        res = detect_slide(s)
        assert not s._closed  # still usable by its owner
        s.read(0, (0, 0, 4, 4))
    assert res.records[0]["source"] == str(svs.path)
    assert [r["bbox_x0"] for r in res.records] == [r["bbox_x0"] for r in whole.records]


def test_detect_task_caps_opencv_threads_at_its_cpu_reservation(monkeypatch):
    # Ray sets OMP_NUM_THREADS to a task's CPUs; OpenCV ignores it and sizes its pool to the
    # machine, so two 1-CPU detect tasks each ran two OpenCV threads.
    import cv2

    from pipeline.job.stage_detect import _match_cpu_reservation

    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        _match_cpu_reservation()
        assert cv2.getNumThreads() == 1
        cv2.setNumThreads(2)
        monkeypatch.delenv("OMP_NUM_THREADS")  # outside a Ray task: left as it is
        _match_cpu_reservation()
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(before)
