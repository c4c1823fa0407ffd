"""Train/serve parity: one crop function (``hemblip.crops``) for the job, ``hemblip caption`` and the
dataset readers, and one red-cell scale estimator (``hemblip.scale``).

The end-to-end check: the job detects the cells of a real BCCD field laid out as a TIFF with its
scale in the resolution tags; ``python -m hemblip caption FIELD --framing cell --center X,Y`` on the
job's centroid gives the job's crop, byte for byte, and the job's caption.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hemblip.crops import cell_crop, crop_box, pad_fraction, resample, thumbnail_jpeg
from hemblip.errors import HemblipConfigError

pytestmark = pytest.mark.unit

BCCD_MPP = 0.072  # as tests/test_detect_stage.py


def _field(shared_data: Path) -> np.ndarray:
    return np.asarray(
        Image.open(shared_data / "bccd" / "JPEGImages" / "BloodImage_00000.jpg").convert("RGB")
    )


# --------------------------------------------------------------------------- the crop function
def test_crop_box_is_the_jobs_square_and_corner():
    # side round(36 / mpp), corner floor(centre - side / 2): the job's rule before this module
    for (cx, cy), mpp in [
        ((100.0, 80.0), 0.25),
        ((100.4, 80.6), 0.072),
        ((0.5, 3.2), 0.5),
        ((7.0, 7.0), 40.0),
    ]:
        side = max(2, int(round(36.0 / mpp)))
        x0, y0 = int(math.floor(cx - side / 2)), int(math.floor(cy - side / 2))
        assert crop_box((cx, cy), mpp) == (x0, y0, x0 + side, y0 + side)


def test_cell_crop_white_matches_a_padded_read_and_reflect_mirrors():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 200, (90, 120, 3), dtype=np.uint8)  # no white pixel in the image
    mpp = 0.5  # 72 px square
    inside = cell_crop(img, (60, 45), mpp, pad="white")
    x0, y0, x1, y1 = crop_box((60, 45), mpp)
    assert np.array_equal(inside, resample(img[y0:y1, x0:x1], 224))
    assert np.array_equal(inside, cell_crop(img, (60, 45), mpp, pad="reflect"))  # no border: same
    corner = cell_crop(img, (5, 5), mpp, pad="white", crop_px=72)  # 72 px: no resampling blur
    assert (corner[:5] == 255).all() and (corner[:, :5] == 255).all()
    mirrored = cell_crop(img, (5, 5), mpp, pad="reflect", crop_px=72)
    assert not (mirrored == 255).all(axis=-1).any()  # smear, not glass
    # the mirror repeats the edge pixel: row -1 is row 0, column -k is column k-1
    x0, y0 = crop_box((5, 5), mpp)[:2]
    assert np.array_equal(mirrored[-y0 - 1], mirrored[-y0]) and np.array_equal(
        mirrored[:, -x0 - 3], mirrored[:, -x0 + 2]
    )
    assert (
        pad_fraction(img.shape, (60, 45), mpp) == 0.0
        and 0.0 < pad_fraction(img.shape, (5, 5), mpp) < 1.0
    )
    # a square far larger than the image (a 120-px dataset crop at a fine scale) still mirrors
    tiny = img[:10, :12]
    assert cell_crop(tiny, (6, 5), 0.05).shape == (224, 224, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mpp": 0.0}, "mpp"),
        ({"mpp": float("nan")}, "mpp"),
        ({"mpp": -1}, "mpp"),
        ({"mpp": 1e9}, "mpp"),
        ({"mpp": True}, "mpp"),
        ({"crop_px": 8}, "crop_px"),
        ({"crop_px": 224.0}, "crop_px"),
        ({"crop_um": 0}, "crop_um"),
        ({"pad": "edge"}, "pad"),
        ({"center_xy": (float("inf"), 3)}, "center"),
        ({"center_xy": "ab"}, "center"),
        ({"mpp": 0.001}, "8192 px"),
    ],
)
def test_cell_crop_bad_arguments_are_one_line_errors(kwargs, match):
    args = {"image": np.zeros((20, 20, 3), np.uint8), "center_xy": (10, 10), "mpp": 0.25} | kwargs
    with pytest.raises(HemblipConfigError, match=match) as info:
        cell_crop(args.pop("image"), args.pop("center_xy"), args.pop("mpp"), **args)
    assert "\n" not in str(info.value)


def test_thumbnail_is_the_jobs():
    from pipeline.job.stage_detect import _jpeg

    crop = np.random.default_rng(1).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    assert _jpeg(crop, 96) == thumbnail_jpeg(crop, 96)
    assert Image.open(io.BytesIO(thumbnail_jpeg(crop))).size == (96, 96)


def test_scale_estimator_is_one_function(shared_data):
    import pipeline.detection as det
    from hemblip import scale

    rgb = _field(shared_data)
    assert det.estimate_mpp(rgb) == scale.estimate_mpp(rgb)
    assert scale.estimate_image_mpp(
        lambda b: rgb[b[1] : b[3], b[0] : b[2]], rgb.shape[1], rgb.shape[0]
    ) == scale.estimate_mpp(rgb)


# --------------------------------------------------------------------------- job vs hemblip caption
@pytest.fixture(scope="module")
def job_field(shared_data, tmp_path_factory):
    """The job's cells of a real BCCD field saved as a TIFF with its scale in the tags."""
    from pipeline.detect import detect_slide

    d = tmp_path_factory.mktemp("parity")
    tif = d / "field.tif"
    Image.fromarray(_field(shared_data)).save(
        tif, resolution=10000.0 / BCCD_MPP, resolution_unit="cm"
    )
    res = detect_slide(tif)
    assert res.info["mpp_source"] == "metadata" and res.records
    return tif, res


def _cli(argv, capsys):
    from hemblip.__main__ import main

    rc = main(["caption", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, [json.loads(x) for x in out.strip().splitlines() if x.strip()], err


def test_job_and_hemblip_caption_give_the_same_crop_and_caption(job_field, tmp_path, capsys):
    from hemblip import Captioner

    tif, res = job_field
    rec = res.records[0]
    job_crop = res.crops[0]
    job_caption = Captioner(None, device="cpu").caption(job_crop[None])[0]

    center = f"{rec['centroid_x']!r},{rec['centroid_y']!r}"  # repr: the exact float
    rc, rows, err = _cli(
        [
            tif,
            "--framing",
            "cell",
            "--center",
            center,
            "--crops-dir",
            tmp_path / "c",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert rc == 0, err
    (row,) = rows
    got = np.asarray(Image.open(row["crop_file"]))
    assert got.shape == job_crop.shape and got.tobytes() == job_crop.tobytes()
    assert row["framing"] == "cell" and row["mpp_source"] == "metadata" and row["mpp"] == rec["mpp"]
    assert row["crop_incomplete"] == ("crop_incomplete" in rec["qc_flags"])
    assert row["caption"] == job_caption.caption
    assert row["cell_type"] == job_caption.cell_type and row["attributes"] == job_caption.attributes


def test_estimated_scale_is_the_jobs_too(shared_data, tmp_path, capsys):
    """No scale anywhere: both estimate it from the red cells, with the same code."""
    from pipeline.detect import detect_slide

    png = tmp_path / "field.png"
    Image.fromarray(_field(shared_data)).save(png)
    res = detect_slide(png)
    assert res.info["mpp_source"] == "estimated"
    rec = res.records[0]
    rc, rows, err = _cli(
        [
            png,
            "--framing",
            "cell",
            "--center",
            f"{rec['centroid_x']!r},{rec['centroid_y']!r}",
            "--crops-dir",
            tmp_path / "c",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert rc == 0, err
    assert rows[0]["mpp"] == rec["mpp"] and rows[0]["mpp_source"] == "estimated"
    assert np.asarray(Image.open(rows[0]["crop_file"])).tobytes() == res.crops[0].tobytes()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--framing", "cell"], "--framing cell needs --center"),
        (["--center", "1,2"], "--center is used only with --framing cell"),
        (["--framing", "cell", "--center", "1;2"], "--center must be X,Y"),
        (["--framing", "cell", "--center", "nan,2"], "--center must be X,Y"),
        (["--framing", "cell", "--center", "1,2\nINJECTED"], "--center must be X,Y"),
        (["--framing", "cell", "--center", "1,2", "--crop-px", "3"], "--crop-px"),
    ],
)
def test_cell_framing_bad_settings_are_one_line_errors(job_field, argv, match, capsys):
    tif, _ = job_field
    rc, rows, err = _cli([tif, *argv], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and rows == [] and len(lines) == 1 and match in lines[0]
