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


_TXL = __import__("pathlib").Path("/work/shared/data/txl_pbc")


@pytest.mark.skipif(not _TXL.is_dir(), reason="shared data not present")
def test_make_samples_whole_smear_cli(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pipeline", "make-samples", str(tmp_path / "ws"), "--whole-smear"]
    tiny = ["--width-mm", "0.8", "--height-mm", "0.5", "--source", "bccd", "--seed", "3"]
    done = subprocess.run(
        [*cmd, *tiny, "--format", "tiff", "--name", "tiny"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "ws").iterdir())
    assert names == ["tiny.tiff", "tiny.truth.json", "tiny.zones.npz", "tiny.zones.png"]
    truth = json.loads((tmp_path / "ws" / "tiny.truth.json").read_text())
    assert (truth["width"], truth["height"], truth["spec"]["seed"]) == (3200, 2000, 3)
    with open_slide(tmp_path / "ws" / "tiny.tiff") as s:
        assert s.format == "openslide:generic-tiff" and s.dimensions == (3200, 2000)
    assert "tiny.tiff" in done.stdout and f"{len(truth['wbcs'])} WBCs" in done.stdout
    # A bad flag is one line naming it; nothing is written.
    bad = subprocess.run(
        [*cmd, *tiny, "--monolayer", "0.7", "--name", "bad"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "monolayer_fraction" in bad.stderr
    assert not list((tmp_path / "ws").glob("bad*"))
