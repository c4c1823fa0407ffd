"""Sample slides: real BCCD fields assembled into pyramidal TIFF/SVS files OpenSlide reads."""

from __future__ import annotations

import json

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from pipeline.samples import BCCD_MPP, SAMPLE_DATA_DIR, build_sample_slides, read_voc_boxes
from pipeline.slides import open_slide

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return build_sample_slides(tmp_path_factory.mktemp("samples"))


def test_bundle_is_small_and_credited():
    files = [p for p in SAMPLE_DATA_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 6_000_000
    assert (SAMPLE_DATA_DIR / "bccd" / "LICENSE").read_text().startswith("MIT License")
    attribution = (SAMPLE_DATA_DIR / "ATTRIBUTION.md").read_text()
    assert "Shenggan/BCCD_Dataset" in attribution and "MIT" in attribution
    jpgs = sorted((SAMPLE_DATA_DIR / "bccd" / "JPEGImages").glob("*.jpg"))
    assert len(jpgs) >= 48
    for j in jpgs:  # every field has its annotation and at least one WBC
        assert read_voc_boxes(SAMPLE_DATA_DIR / "bccd" / "Annotations" / f"{j.stem}.xml")


def test_recorded_mpp_matches_the_red_cells_of_the_bundle():
    sides = []
    for x in (SAMPLE_DATA_DIR / "bccd" / "Annotations").glob("*.xml"):
        for x0, y0, x1, y1 in read_voc_boxes(x, "RBC"):
            sides.append(((x1 - x0) + (y1 - y0)) / 2)
    assert len(sides) > 200
    assert 7.5 / np.median(sides) == pytest.approx(BCCD_MPP, rel=0.1)


def test_formats_levels_and_mpp_as_openslide_reports_them(samples):
    assert len(samples) >= 3
    vendors = {s.format for s in samples}
    assert vendors == {"openslide:generic-tiff", "openslide:aperio"}
    for s in samples:
        osr = openslide.OpenSlide(str(s.path))
        try:
            assert f"openslide:{osr.properties['openslide.vendor']}" == s.format
            assert osr.level_count >= 3
            assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(BCCD_MPP, rel=1e-6)
            w, h = osr.dimensions
            assert w >= 2000 and h >= 2000
            ds = osr.level_downsamples
            assert all(b > a for a, b in zip(ds, ds[1:]))
        finally:
            osr.close()
        with tifffile.TiffFile(s.path) as tf:  # consecutive pages, tiled JPEG, no SubIFDs
            assert len(tf.pages) >= 3
            for page in tf.pages:
                assert page.is_tiled and page.compression == tifffile.COMPRESSION.JPEG
                assert "SubIFDs" not in page.tags
            if s.format == "openslide:aperio":
                assert tf.pages[0].description.startswith("Aperio Image Library")


def test_truth_sidecar_boxes_sit_on_the_source_fields(samples):
    for s in samples:
        truth = json.loads(s.truth_path.read_text())
        assert len(truth["wbc_boxes"]) == s.n_wbc >= 10
        with open_slide(s.path) as sl:
            assert (truth["width"], truth["height"]) == sl.dimensions
            for x0, y0, x1, y1 in truth["wbc_boxes"]:
                assert 0 <= x0 < x1 <= sl.dimensions[0] and 0 <= y0 < y1 <= sl.dimensions[1]
            f = truth["fields"][3]
            got = sl.read(0, (f["x"], f["y"], f["x"] + f["width"], f["y"] + f["height"]))
        src = np.asarray(Image.open(SAMPLE_DATA_DIR / f["image"]).convert("RGB"))
        assert np.abs(got.astype(int) - src.astype(int)).mean() < 3  # JPEG round trip only


def test_deterministic_bytes(samples, tmp_path):
    again = build_sample_slides(tmp_path)
    for a, b in zip(samples, again):
        assert a.path.name == b.path.name
        assert a.path.read_bytes() == b.path.read_bytes()
        assert a.truth_path.read_bytes() == b.truth_path.read_bytes()
