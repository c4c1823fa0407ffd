"""Every kind of bad input gives one clear line naming the file and the cause."""

from __future__ import annotations

import shutil
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline.detect import DetectConfig, detect_slide
from pipeline.errors import (
    ScaleError,
    SlideError,
    SlideOpenError,
    SlideReadError,
    SlideTooLargeError,
)
from pipeline.samples import SAMPLE_DATA_DIR
from pipeline.slides import open_slide

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::FutureWarning")]

FIELD = SAMPLE_DATA_DIR / "bccd" / "JPEGImages" / "BloodImage_00000.jpg"


def _expect(exc_type, path, *causes, config=None):
    """detect_slide(path) raises exc_type, one line starting with the path, naming the cause."""
    with pytest.raises(exc_type) as ei:
        detect_slide(path, config or DetectConfig())
    msg = str(ei.value)
    assert isinstance(ei.value, SlideError)
    assert msg.startswith(f"{path}: "), msg
    assert "\n" not in msg
    assert any(c in msg for c in causes), msg
    return msg


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (the data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def _pyramid(path, w=512, h=384):
    rgb = np.asarray(Image.open(FIELD).convert("RGB").resize((w, h)))
    with tifffile.TiffWriter(path) as tw:
        for i in range(3):
            r = 1e4 / (0.1 * 2**i)
            tw.write(
                rgb[:: 2**i, :: 2**i].copy(),
                tile=(64, 64),
                photometric="rgb",
                compression="jpeg",
                resolution=(r, r),
                resolutionunit="CENTIMETER",
                metadata=None,
                subfiletype=int(i > 0),
            )
    return path


def test_missing_file(tmp_path):
    _expect(SlideOpenError, tmp_path / "nope.svs", "no such file")


def test_zero_byte(tmp_path):
    p = tmp_path / "empty.svs"
    p.write_bytes(b"")
    _expect(SlideOpenError, p, "empty file")


def test_directory(tmp_path):
    _expect(SlideOpenError, tmp_path, "directory")


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.svs"
    p.write_text("this is a text file, not a slide\n" * 20)
    _expect(SlideOpenError, p, "not a recognised slide or image format")


def test_truncated_jpeg(tmp_path):
    p = tmp_path / "cut.jpg"
    p.write_bytes(FIELD.read_bytes()[:4000])
    _expect(SlideReadError, p, "truncated")


@pytest.mark.parametrize("keep", [0.33, 0.5, 0.85])
def test_truncated_pyramid(tmp_path, keep):
    full = _pyramid(tmp_path / "full.tiff")
    p = tmp_path / "cut.tiff"
    data = full.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(
        (SlideOpenError, SlideReadError)
    ) as ei:  # open or tile read, by where the cut is
        detect_slide(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: ") and "\n" not in msg
    assert "truncated" in msg or "corrupt" in msg or "read failed" in msg, msg


def test_unopenable_openslide_fixture(shared_data):
    p = shared_data / "openslide_fixtures" / "unopenable.tiff"
    _expect(SlideOpenError, p, "Unsupported TIFF compression")


def test_opens_but_tile_read_fails(shared_data):
    p = shared_data / "openslide_fixtures" / "unreadable.svs"
    with open_slide(p) as s:  # it opens ...
        assert s.dimensions == (16, 16)
    _expect(SlideReadError, p, "tile read failed")  # ... but its pixels cannot be decoded


def test_decompression_bomb_plain_image(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header(100_000, 100_000))  # 10^10 px declared in 80 bytes
    _expect(SlideTooLargeError, p, "100000x100000")
    p2 = tmp_path / "big.png"
    p2.write_bytes(_png_header(5000, 5000))
    _expect(SlideTooLargeError, p2, "limit", config=DetectConfig(max_pixels=10_000_000))


def test_decompression_bomb_pyramid(tmp_path):
    p = tmp_path / "bomb.tiff"
    tifffile.imwrite(
        p, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb", metadata=None
    )
    with tifffile.TiffFile(p, mode="r+") as tf:  # declare 4M x 4M px in 4 huge tiles
        tags = tf.pages[0].tags
        for name, v in (
            ("ImageWidth", 1 << 22),
            ("ImageLength", 1 << 22),
            ("TileWidth", 1 << 21),
            ("TileLength", 1 << 21),
        ):
            tags[name].overwrite(v)
    _expect(SlideTooLargeError, p, "side limit")


def test_detection_level_over_the_limit(tmp_path):
    p = _pyramid(tmp_path / "ok.tiff")
    _expect(SlideTooLargeError, p, "detection level", config=DetectConfig(max_detect_pixels=1000))


def test_no_mpp_and_no_red_cells(tmp_path):
    p = tmp_path / "blank glass.png"
    Image.fromarray(np.full((300, 400, 3), 238, np.uint8)).save(p)
    _expect(
        ScaleError,
        p,
        "no mpp in metadata, none given (--mpp), and no red cells to estimate it from",
    )
    # With --mpp it is simply a slide without cells.
    assert detect_slide(p, DetectConfig(mpp=0.1)).records == []


def test_unicode_and_spaces_in_names(tmp_path):
    good = tmp_path / "frottis sanguin ✓ 血液.jpg"
    shutil.copy(FIELD, good)
    res = detect_slide(good, DetectConfig(mpp=0.072))
    assert res.records and res.records[0]["source"] == str(good)
    bad = tmp_path / "échantillon vide ✗.svs"
    bad.write_bytes(b"")
    _expect(SlideOpenError, bad, "empty file")
    pyr = _pyramid(tmp_path / "pyramide ü 1.tiff")
    with open_slide(pyr) as s:
        assert s.level_count == 3 and s.mpp == pytest.approx(0.1)
