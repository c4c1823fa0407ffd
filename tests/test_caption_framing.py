"""``python -m hemblip caption`` says what framing it applies and refuses whole fields unasked.

The job captions a fixed 36 µm square around each detected cell; ``hemblip caption`` captions each
image as given. A crop-sized image is captioned as given and every output row says so; an image
that is clearly a whole field (larger than twice the job's crop at its scale, or without a scale
larger than twice the model input / job crop in pixels) is refused with a one-line error until
``--framing as-given`` is passed, and the message names ``python -m pipeline detect`` for fields.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def images(shared_data):
    """Real single-cell crops of three datasets and one real whole field (BCCD, 640x480)."""
    import csv

    seg1 = sorted((shared_data / "segmentation_wbc" / "dataset1").glob("[0-9][0-9][0-9].png"))[0]
    seg2 = sorted((shared_data / "segmentation_wbc" / "dataset2").glob("[0-9][0-9][0-9].png"))[0]
    with open(shared_data / "txl_pbc" / "source_map.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["source"] == "pbc")
    pbc = shared_data / "txl_pbc" / "images" / row["txl_split"] / f"{row['uuid']}.jpg"
    field = shared_data / "bccd" / "JPEGImages" / "BloodImage_00001.jpg"
    for p in (seg1, seg2, pbc, field):
        assert p.is_file(), p
    return {"seg1": seg1, "seg2": seg2, "pbc": pbc, "field": field}


def _run(argv, capsys):
    from hemblip.__main__ import main

    rc = main(["caption", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, [json.loads(x) for x in out.strip().splitlines()], err.strip().splitlines()


def test_dataset_crops_are_captioned_as_given_and_every_row_says_so(images, capsys):
    rc, rows, err = _run([images["seg1"], images["seg2"], images["pbc"]], capsys)
    assert rc == 0 and err == []
    assert [r["image"] for r in rows] == [str(images[k]) for k in ("seg1", "seg2", "pbc")]
    assert all(r["framing"] == "as-given" and r["caption"] for r in rows)


def test_a_whole_field_is_refused_unless_framing_is_given(images, tmp_path, capsys):
    odd = tmp_path / "field\nsecond line.jpg"  # a hostile name must not split the error line
    shutil.copyfile(images["field"], odd)
    rc, rows, err = _run([images["field"], images["seg1"], odd], capsys)
    assert rc == 1
    assert [r["image"] for r in rows] == [str(images["seg1"])]  # the batch goes on
    assert len(err) == 2
    assert err[0].startswith(str(images["field"])) and "640x480" in err[0]
    assert err[1].startswith(repr(str(odd)))
    for line in err:
        assert "--framing as-given" in line and "python -m pipeline detect" in line

    rc, rows, err = _run([images["field"], "--framing", "as-given"], capsys)
    assert rc == 0 and len(rows) == 1 and rows[0]["framing"] == "as-given" and rows[0]["caption"]
    assert len(err) == 1 and "as given" in err[0] and "36 µm" in err[0]


def _tiff(path: Path, px: int, mpp: float) -> Path:
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 255, (px, px, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, resolution=10000.0 / mpp, resolution_unit="cm")
    return path


def test_the_scale_decides_when_it_is_known(images, tmp_path, capsys):
    from PIL import Image

    wide = _tiff(tmp_path / "wide.tif", 300, 0.5)  # 150 µm: a field, though only 300 px
    fine = _tiff(tmp_path / "fine.tif", 800, 0.045)  # 36 µm: one crop, though 800 px
    rc, rows, err = _run([wide, fine], capsys)
    assert rc == 1 and [r["image"] for r in rows] == [str(fine)]
    assert len(err) == 1 and err[0].startswith(str(wide)) and "150x150 µm" in err[0]

    png = tmp_path / "crop.png"  # PNG carries no scale: --mpp gives it
    Image.open(images["seg2"]).save(png)
    rc, rows, err = _run([png, "--mpp", "0.5"], capsys)
    assert rc == 1 and rows == [] and len(err) == 1 and "µm" in err[0]
    rc, rows, err = _run([png, "--mpp", "0.12"], capsys)
    assert rc == 0 and len(rows) == 1


def test_detect_framing_and_bad_settings_are_one_line_errors(images, capsys):
    rc, rows, err = _run([images["field"], "--framing", "detect"], capsys)
    assert rc == 2 and rows == [] and len(err) == 1
    assert err[0].startswith("error: --framing detect") and "python -m pipeline detect" in err[0]
    for bad in ("0", "nan", "-1", "1e9"):
        rc, rows, err = _run([images["seg1"], "--mpp", bad], capsys)
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: --mpp"), bad


def _png_header_only(path: Path, w: int, h: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def test_a_huge_declared_image_is_refused_from_its_header(images, tmp_path, capsys):
    bomb = _png_header_only(tmp_path / "bomb.png", 40000, 40000)  # 1.6 Gpx declared in 100 bytes
    for extra in ([], ["--framing", "as-given"]):
        rc, rows, err = _run([bomb, images["seg1"], *extra], capsys)
        assert rc == 1 and [r["image"] for r in rows] == [str(images["seg1"])]
        refusals = [e for e in err if e.startswith(str(bomb))]
        assert len(refusals) == 1 and "40000x40000" in refusals[0], err
