"""Which pyramid level detection reads (``DetectorConfig.max_detect_mpp``), and that reading a
coarser level finds the same cells with the same level-0 morphometry as the old rule."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import tifffile

from pipeline.detect import DetectConfig, _detect_level, detect_slide
from pipeline.detection import DetectorConfig
from pipeline.errors import ConfigError
from pipeline.slides import open_slide

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::FutureWarning")]


def _write_pyramid(path, levels, mpp0, compression="jpeg"):
    """Consecutive tiled TIFF pages (OpenSlide generic-tiff), scale in the resolution tags."""
    w0 = levels[0].shape[1]
    with tifffile.TiffWriter(path) as tw:
        for i, lvl in enumerate(levels):
            ds = w0 / lvl.shape[1]
            tw.write(
                lvl,
                tile=(256, 256) if min(lvl.shape[:2]) >= 256 else (32, 32),
                compression=compression,
                photometric="rgb",
                resolution=(1e4 / (mpp0 * ds), 1e4 / (mpp0 * ds)),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                metadata=None,
                software=False,
            )
    return path


def _grey_pyramid(path, mpp0, factor=4, side=1024, n=3):
    rng = np.random.default_rng(0)
    levels = [rng.integers(150, 250, (side, side, 3), dtype=np.uint8)]
    for _ in range(n - 1):
        prev = levels[-1]
        levels.append(
            cv2.resize(
                prev,
                (prev.shape[1] // factor, prev.shape[0] // factor),
                interpolation=cv2.INTER_AREA,
            )
        )
    return _write_pyramid(path, levels, mpp0, compression="zlib")


@pytest.mark.parametrize(
    ("mpp0", "factor", "cap", "want"),
    [
        (0.25, 4, 1.1, 1),  # 40x: 0.25 / 1.0 / 4.0 -> the 1.0 µm/px level
        (0.25, 4, None, 0),  # default rule: 0.25 and 1.0 tie around 0.5, the finer wins
        (0.25, 2, None, 1),  # default rule: 0.25 / 0.5 / 1.0 -> 0.5
        (0.25, 4, 0.5, 0),  # nothing between 0.25 and 0.5: level 0
        (0.25, 4, 4.0, 2),
        (0.2527, 4, 1.1, 1),  # Aperio: level 1 is 1.011 µm/px
        (0.2527, 4, 1.0, 0),  # ...just over a cap of exactly 1.0
        (0.5, 4, 1.1, 0),  # 20x: 0.5 / 2.0 / 8.0
        (0.25, 2, 1.1, 2),  # 0.25 / 0.5 / 1.0
        (2.0, 2, 1.1, 0),  # every level coarser than the cap: level 0
    ],
)
def test_detect_level_rule(tmp_path, mpp0, factor, cap, want):
    path = _grey_pyramid(tmp_path / "p.tiff", mpp0, factor)
    with open_slide(path) as slide:
        assert slide.level_count == 3
        assert slide.mpp == pytest.approx(mpp0, rel=1e-3)
        assert _detect_level(slide, slide.mpp, DetectorConfig(max_detect_mpp=cap)) == want


def test_default_rule_and_validation():
    # opt-in: on JPEG-stored coarse levels recall fell 0.02-0.04 (docs/readme/detection.md)
    assert DetectorConfig().max_detect_mpp is None
    assert DetectorConfig(max_detect_mpp=1.1).max_detect_mpp == 1.1
    for bad in (0.3, 6.0, float("nan"), True, "1.0"):
        with pytest.raises(ConfigError, match=r"max_detect_mpp \(--max-detect-mpp\)"):
            DetectorConfig(max_detect_mpp=bad)
    # the cap follows working_mpp: below it the stage would read finer pixels than it uses
    DetectorConfig(working_mpp=0.25, max_detect_mpp=0.3)
    with pytest.raises(ConfigError, match="working_mpp = 1.0"):
        DetectorConfig(working_mpp=1.0, max_detect_mpp=0.75)


def test_job_config_passes_max_detect_mpp(tmp_path):
    from pipeline.job.config import load_config
    from pipeline.job.stage_detect import DetectSettings

    cfg = load_config(
        None, {"input": str(tmp_path), "output": str(tmp_path / "o"), "max_detect_mpp": "0.75"}
    )
    assert cfg.max_detect_mpp == 0.75
    assert load_config(None, {"input": "a", "output": "b"}).max_detect_mpp is None
    with pytest.raises(
        ConfigError, match=r"--max-detect-mpp \(config key max_detect_mpp\).*working_mpp"
    ):
        load_config(None, {"input": "a", "output": "b", "max_detect_mpp": 0.2})
    assert DetectSettings(s3=None).max_detect_mpp is None


# -- real smear: the bundled BCCD sample slide re-written as a 40x pyramid (0.25/1.0/4.0 µm/px)


@pytest.fixture(scope="module")
def slide_40x(tmp_path_factory):
    from pipeline.samples import build_sample_slides

    d = tmp_path_factory.mktemp("lvl")
    sample = build_sample_slides(d)[2]  # sample_3.tiff: 16 BCCD fields, 16 WBCs
    with open_slide(sample.path) as s:
        w, h = s.dimensions
        level0, mpp = s.read(0, (0, 0, w, h)), s.mpp
    f = mpp / 0.25
    levels = [cv2.resize(level0, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)]
    for _ in range(2):
        p = levels[-1]
        levels.append(
            cv2.resize(p, (p.shape[1] // 4, p.shape[0] // 4), interpolation=cv2.INTER_AREA)
        )
    # lossless: this test is about the level rule and the coordinates, not JPEG (see the docs)
    return sample, _write_pyramid(d / "sample_3_40x.tiff", levels, 0.25, compression="zlib")


def test_bundled_sample_slide_level_unchanged(slide_40x):
    sample, _ = slide_40x
    with open_slide(sample.path) as slide:  # 0.072 / 0.144 / 0.288 / 0.576 µm/px
        old = _detect_level(slide, slide.mpp, DetectorConfig(max_detect_mpp=None))
        new = _detect_level(slide, slide.mpp, DetectorConfig(max_detect_mpp=1.1))
    assert old == new == 3


def test_coarse_level_finds_the_same_cells_and_measures_them_alike(slide_40x):
    _, path = slide_40x
    old = detect_slide(path, DetectConfig())
    new = detect_slide(path, DetectConfig(detector=DetectorConfig(max_detect_mpp=1.1)))
    assert old.info["detect_level"] == 0 and old.info["detect_mpp"] == pytest.approx(0.25, rel=1e-3)
    assert new.info["detect_level"] == 1 and new.info["detect_mpp"] == pytest.approx(1.0, rel=0.01)
    assert len(old.records) >= 12
    assert abs(len(new.records) - len(old.records)) <= 1
    # pair cells by centroid (level-0 px); coordinates from the coarse level stay within ~1 µm
    mpp = old.info["mpp"]
    pairs = []
    free = list(range(len(new.records)))
    for i, r in enumerate(old.records):
        d = [
            (
                math.hypot(
                    r["centroid_x"] - new.records[j]["centroid_x"],
                    r["centroid_y"] - new.records[j]["centroid_y"],
                )
                * mpp,
                j,
            )
            for j in free
        ]
        if d and min(d)[0] <= 3.0:
            dist, j = min(d)
            free.remove(j)
            pairs.append((i, j, dist))
    assert len(pairs) >= len(old.records) - 1
    assert max(p[2] for p in pairs) <= 2.0
    assert np.median([p[2] for p in pairs]) <= 1.0
    # morphometry is measured on the level-0 crop: the nucleus barely moves, the whole-cell
    # outline (pale cytoplasm against red cells) may shift with the crop centre
    for key, med_tol in (
        ("nucleus_area_um2", 0.03),
        ("cell_diameter_um", 0.05),
        ("cell_area_um2", 0.1),
    ):
        rel = [
            abs(new.records[j][key] - old.records[i][key]) / abs(old.records[i][key])
            for i, j, _ in pairs
            if old.records[i][key] and new.records[j][key] is not None
        ]
        assert np.median(rel) <= med_tol, key
    same_lobes = sum(
        old.records[i]["nucleus_lobes"] == new.records[j]["nucleus_lobes"] for i, j, _ in pairs
    )
    assert same_lobes >= 0.8 * len(pairs)
    # boxes map back into the level-0 frame; the detector's whole-cell extent (a watershed
    # against red cells) sometimes stops at another red-cell border on the coarser level
    edges = np.array(
        [
            abs(old.records[i][k] - new.records[j][k]) * mpp
            for i, j, _ in pairs
            for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")
        ]
    )
    assert np.median(edges) <= 1.0
    assert (edges <= 2.5).mean() >= 0.8
    assert edges.max() <= 15.0
    # crops: same cell, so the two crops look alike
    for i, j, _ in pairs:
        diff = np.abs(old.crops[i].astype(int) - new.crops[j].astype(int)).mean()
        assert diff < 25


def test_detect_cli_max_detect_mpp(slide_40x, tmp_path, capsys):
    from pipeline.__main__ import main

    _, path = slide_40x
    out = tmp_path / "c.parquet"
    assert main(["detect", str(path), "--out", str(out)]) == 0
    assert "detected on level 0/2" in capsys.readouterr().out
    assert main(["detect", str(path), "--out", str(out), "--max-detect-mpp", "1.1"]) == 0
    assert "detected on level 1/2" in capsys.readouterr().out
    assert main(["detect", str(path), "--out", str(out), "--max-detect-mpp", "0.2"]) == 2
    assert "--max-detect-mpp" in capsys.readouterr().err


def test_job_detect_stage_uses_max_detect_mpp(slide_40x):

    from pipeline.job.listing import SlidePart, SlideRef
    from pipeline.job.stage_detect import DetectSettings, process_slide

    _, path = slide_40x
    size = path.stat().st_size
    ref = SlideRef(
        "s1", str(path), "e", size, (SlidePart(str(path), path.name, size, "e"),), path.name
    )

    def centroids(**kw):
        batches = list(process_slide(ref, DetectSettings(s3=None, thumbnails=False, **kw)))
        from pipeline.job.stage_detect import records

        recs = [r for b in batches for r in records(b)]
        assert recs[-1]["status"] == "ok", recs[-1]["reason"]
        return [(r["centroid_x"], r["centroid_y"]) for r in recs[:-1]]

    def direct(cap):
        res = detect_slide(path, DetectConfig(detector=DetectorConfig(max_detect_mpp=cap)))
        return [(r["centroid_x"], r["centroid_y"]) for r in res.records]

    default, coarse = centroids(), centroids(max_detect_mpp=4.0)
    assert default == direct(None) and coarse == direct(4.0)
    assert coarse != default  # the setting reached the detector (level 2, 4.0 µm/px)
