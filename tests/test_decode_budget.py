"""Decompression bombs and hostile TIFF headers: every decoder's memory is budgeted from the
header before decoding, and the local and remote readers give one verdict on hostile TIFFs."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

import pipeline.slides._image as image_backend
from pipeline.detect import DetectConfig, detect_slide
from pipeline.errors import ConfigError, SlideOpenError, SlideReadError, SlideTooLargeError
from pipeline.samples import SAMPLE_DATA_DIR
from pipeline.slides import MAX_TIFF_DIRECTORIES, open_slide

FIELD = SAMPLE_DATA_DIR / "bccd" / "JPEGImages" / "BloodImage_00000.jpg"
REPO = Path(__file__).resolve().parents[1]


# -- cheap bombs ---------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(path: Path, w: int, h: int, extra_chunks: bytes = b"") -> Path:
    """A valid RGB PNG of w x h zeros in ~w*h/250 bytes: one row deflated after a full flush
    compresses to the same bytes every time, so the IDAT is that block repeated."""
    row = b"\0" * (1 + 3 * w)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    c.compress(row)
    c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(row) + c.flush(zlib.Z_FULL_FLUSH)  # a row after a reset
    tail = c.flush()
    adler = 1
    for _ in range(h):
        adler = zlib.adler32(row, adler)
    idat = b"\x78\x01" + block * h + tail + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + extra_chunks
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )
    return path


def _gif_bomb(path: Path, w: int, h: int) -> Path:
    """A GIF whose screen and one frame declare w x h px, with a few bytes of LZW data."""
    head = b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x4c\x01\x00\x3b"
    path.write_bytes(head + frame)
    return path


def _progressive_jpeg_bomb(path: Path, w: int, h: int) -> Path:
    """A small progressive JPEG whose frame header (SOF2) is rewritten to declare w x h px."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 100, 50)).save(buf, "JPEG", progressive=True)
    data = bytearray(buf.getvalue())
    i = data.find(b"\xff\xc2")
    data[i + 5 : i + 9] = struct.pack(">HH", h, w)
    path.write_bytes(bytes(data))
    return path


def _webp_bomb(path: Path) -> Path:
    """A lossless WebP whose VP8L header is rewritten to WebP's largest canvas, 16383 x 16383."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(buf, "WEBP", lossless=True)
    data = bytearray(buf.getvalue())
    i = data.find(b"VP8L") + 8
    assert data[i] == 0x2F
    bits = struct.unpack("<I", bytes(data[i + 1 : i + 5]))[0]
    bits = (bits & ~((1 << 28) - 1)) | 16382 | (16382 << 14)
    data[i + 1 : i + 5] = struct.pack("<I", bits)
    path.write_bytes(bytes(data))
    return path


def _bmp_bomb(path: Path, w: int, h: int) -> Path:
    """A 24-bit BMP header declaring w x h px and no pixel data."""
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
    path.write_bytes(b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + info)
    return path


def _one_strip_tiff_bomb(path: Path, w: int, h: int) -> Path:
    """A plain (stripped) TIFF declaring w x h px in one strip (the Pillow backend's case)."""
    tifffile.imwrite(
        path,
        np.zeros((16, 16, 3), np.uint8),
        photometric="rgb",
        metadata=None,
        compression="zlib",
        rowsperstrip=16,
    )
    with tifffile.TiffFile(path, mode="r+") as tf:
        tags = tf.pages[0].tags
        for name, v in (("ImageWidth", w), ("ImageLength", h), ("RowsPerStrip", h)):
            tags[name].overwrite(v)
    return path


def _huge_tile_tiff(path: Path, side: int) -> Path:
    """A tiled TIFF (an OpenSlide generic-tiff) declaring one side x side px tile."""
    tifffile.imwrite(
        path,
        np.full((512, 512, 3), 200, np.uint8),
        tile=(256, 256),
        photometric="rgb",
        metadata=None,
    )
    with tifffile.TiffFile(path, mode="r+") as tf:
        tags = tf.pages[0].tags
        for name in ("ImageWidth", "ImageLength", "TileWidth", "TileLength"):
            tags[name].overwrite(side)
    return path


def _jpeg_tile_tiff(path: Path, declared: int) -> Path:
    """A tiled JPEG TIFF whose first tile's JPEG frame header declares declared x declared px
    (the TIFF says 64 x 64)."""
    rgb = np.random.default_rng(0).integers(0, 255, (256, 256, 3)).astype(np.uint8)
    tifffile.imwrite(path, rgb, tile=(64, 64), photometric="rgb", compression="jpeg", metadata=None)
    with tifffile.TiffFile(path) as tf:
        off, n = tf.pages[0].dataoffsets[0], tf.pages[0].databytecounts[0]
    data = bytearray(path.read_bytes())
    i = bytes(data[off : off + n]).find(b"\xff\xc0")
    assert i > 0
    data[off + i + 5 : off + i + 9] = struct.pack(">HH", declared, declared)
    path.write_bytes(bytes(data))
    return path


def _many_ifds(path: Path, n: int) -> Path:
    """A generic tiled TIFF (256 x 256 px, then a 64 x 64 px reduced level) whose IFD chain goes
    on with copies of the reduced level's IFD, ``n`` directories in all (~150 bytes each)."""
    with tifffile.TiffWriter(path, bigtiff=False, byteorder="<") as tw:
        tw.write(
            np.full((256, 256, 3), 200, np.uint8),
            tile=(64, 64),
            photometric="rgb",
            metadata=None,
            compression="zlib",
        )
        tw.write(
            np.full((64, 64, 3), 100, np.uint8),
            tile=(64, 64),
            photometric="rgb",
            metadata=None,
            compression="zlib",
            subfiletype=1,
        )
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tf:
        ifd = tf.pages[1].offset
    count = struct.unpack_from("<H", data, ifd)[0]
    size = 2 + 12 * count + 4
    body = bytes(data[ifd : ifd + size - 4])
    if len(data) % 2:
        data += b"\0"
    start = len(data)
    copies = bytearray()
    for k in range(n - 2):
        nxt = start + (k + 1) * size if k < n - 3 else 0
        copies += body + struct.pack("<I", nxt)
    struct.pack_into("<I", data, ifd + size - 4, start)
    path.write_bytes(bytes(data + copies))
    return path


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bombs")
    # acTL: an animated PNG declaring 100,000 frames.
    actl = _chunk(b"acTL", struct.pack(">II", 100_000, 0))
    return {
        "png": _png_bomb(d / "bomb.png", 20000, 20000),
        "apng": _png_bomb(d / "frames.png", 12000, 12000, actl),
        "gif": _gif_bomb(d / "bomb.gif", 20000, 20000),
        "jpeg-progressive": _progressive_jpeg_bomb(d / "bomb.jpg", 20000, 20000),
        "webp": _webp_bomb(d / "bomb.webp"),
        "bmp": _bmp_bomb(d / "bomb.bmp", 20000, 20000),
        "tiff-one-strip": _one_strip_tiff_bomb(d / "bomb.tif", 20000, 20000),
    }


def _one_line(exc: BaseException, path: Path, *parts: str) -> str:
    msg = str(exc)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg
    return msg


# -- plain images: the Pillow backend decodes the whole image ------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize(
    "kind, dims",
    [
        ("png", "20000x20000"),
        ("apng", "12000x12000"),
        ("gif", "20000x20000"),
        ("jpeg-progressive", "20000x20000"),
        ("webp", "16383x16383"),
        ("bmp", "20000x20000"),
        ("tiff-one-strip", "20000x20000"),
    ],
)
def test_plain_image_bombs_are_refused_from_the_header(bombs, kind, dims):
    with pytest.raises(SlideTooLargeError) as ei:
        open_slide(bombs[kind]).close()
    _one_line(ei.value, bombs[kind], dims, "MiB to decode", "1024 MiB decode budget")


@pytest.mark.unit
def test_cli_on_a_png_bomb_prints_one_line_and_stays_small(bombs, tmp_path):
    # The 1.5 MB PNG that took 5.6 GB RSS: refused from its header. Peak RSS measured in the
    # child itself (VmHWM, KiB), not a timing.
    bomb = bombs["png"]
    rss_file = tmp_path / "rss"
    # ru_maxrss survives fork+exec on Linux (the forked copy of a big pytest process counts), so
    # the child resets its peak (clear_refs 5) and reads VmHWM from /proc itself.
    code = (
        "import runpy, sys\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        f"sys.argv = ['pipeline', 'detect', {str(bomb)!r}, '--out', {str(tmp_path / 'c.parquet')!r},"
        " '--mpp', '0.1']\n"
        "try:\n"
        "    runpy.run_module('pipeline', run_name='__main__', alter_sys=True)\n"
        "    rc = 0\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0].split()[1]\n"
        f"open({str(rss_file)!r}, 'w').write(hwm)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: {bomb}: declared dimensions 20000x20000"), errors[0]
    assert int(rss_file.read_text()) < 600 * 1024, "peak RSS over 600 MB"


@pytest.mark.unit
def test_budget_is_a_setting(tmp_path):
    # 640 x 480 JPEG: about 4 MiB to decode here.
    with open_slide(FIELD) as s:
        assert s.read(0, (0, 0, 8, 8)).shape == (8, 8, 3)
    with pytest.raises(SlideTooLargeError) as ei:
        open_slide(FIELD, max_decode_mb=1)
    _one_line(ei.value, FIELD, "640x480", "1.0 MiB decode budget")
    with pytest.raises(SlideTooLargeError):
        detect_slide(FIELD, DetectConfig(mpp=0.1, max_decode_mb=1))
    for bad in (0, -1, float("nan"), "512", True):
        with pytest.raises(ConfigError, match="max-decode-mb"):
            open_slide(FIELD, max_decode_mb=bad)
        with pytest.raises(ConfigError, match="max_decode_mb"):
            DetectConfig(max_decode_mb=bad)


@pytest.mark.unit
def test_cli_flag_sets_the_budget(tmp_path, capsys):
    from pipeline.__main__ import main

    rc = main(["detect", str(FIELD), "--out", str(tmp_path / "c.parquet"), "--max-decode-mb", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "1.0 MiB decode budget" in err[0], err


def _reference_rgb(im: Image.Image) -> np.ndarray:
    """The Pillow backend's former whole-image conversion (the pixels must not change)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    elif im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = arr.max() or 1.0
        im = Image.fromarray((arr * (255.0 / top)).astype(np.uint8))
    return np.asarray(im.convert("RGB"))


@pytest.mark.unit
def test_banded_decode_gives_the_same_pixels(tmp_path, monkeypatch):
    monkeypatch.setattr(image_backend, "_BAND_PX", 7 * 37)  # many bands, one not full
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (29, 37, 4)).astype(np.uint8)
    cases = {
        "rgb.png": Image.fromarray(rgba[..., :3]),
        "rgba.png": Image.fromarray(rgba),
        "la.png": Image.fromarray(np.ascontiguousarray(rgba[..., [0, 3]])),
        "p.png": Image.fromarray(rgba[..., :3]).convert("P"),
        "i16.png": Image.fromarray(rng.integers(0, 4000, (29, 37)).astype(np.uint16)),
    }
    pt = Image.fromarray(rgba[..., :3]).convert("P")
    pt.info["transparency"] = 5
    cases["p_transparent.png"] = pt
    for orient in range(2, 9):
        exif = Image.Exif()
        exif[0x0112] = orient
        p = tmp_path / f"o{orient}.png"
        Image.fromarray(rgba[..., :3]).save(p, exif=exif)
        cases[p.name] = None
    for name, im in cases.items():
        p = tmp_path / name
        if im is not None:
            im.save(p, **({"transparency": 5} if name == "p_transparent.png" else {}))
        with Image.open(p) as ref_im:
            ref = _reference_rgb(ref_im)
        with open_slide(p) as s:
            got = s.read(0, (0, 0, *s.dimensions))
        np.testing.assert_array_equal(got, ref, err_msg=name)


# -- tiled slides: one tile, one read ------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("side", [65536, 32768])
def test_openslide_tiff_declaring_a_huge_tile_is_refused_at_open(tmp_path, side):
    # OpenSlide would allocate the whole tile (16 GiB at 65536 px; a failed allocation aborts
    # the process) on the first read: refuse from the header, before any read.
    p = _huge_tile_tiff(tmp_path / f"tile{side}.tiff", side)
    with pytest.raises(SlideTooLargeError) as ei:
        open_slide(p).close()
    _one_line(ei.value, p, f"{side}x{side} px tiles", "decode budget")


@pytest.mark.unit
def test_a_read_is_budgeted_in_bytes(tmp_path):
    p = tmp_path / "pyr.tiff"
    tifffile.imwrite(
        p, np.full((300, 400, 3), 90, np.uint8), tile=(64, 64), photometric="rgb", metadata=None
    )
    with open_slide(p, max_decode_mb=1) as s:
        assert s.read(0, (0, 0, 100, 100)).shape == (100, 100, 3)
        with pytest.raises(SlideTooLargeError) as ei:
            s.read(0, (0, 0, 400, 300))
    _one_line(ei.value, p, "a read of 400x300 px", "decode budget")


# -- many TIFF directories -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def many_ifds(tmp_path_factory) -> Path:
    return _many_ifds(tmp_path_factory.mktemp("ifds") / "ifds.tiff", 20000)


@pytest.mark.unit
def test_tiff_with_tens_of_thousands_of_directories_is_refused_locally(many_ifds, tmp_path):
    with pytest.raises(SlideOpenError) as ei:
        open_slide(many_ifds).close()
    _one_line(ei.value, many_ifds, f"more than {MAX_TIFF_DIRECTORIES} TIFF directories")
    # At the limit it is still a slide.
    ok = _many_ifds(tmp_path / "ok.tiff", MAX_TIFF_DIRECTORIES)
    with open_slide(ok) as s:
        assert s.level_count == MAX_TIFF_DIRECTORIES


# -- the remote TIFF reader agrees ---------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(s3_server):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"decode-budget-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


def _upload(s3, path: Path, key: str):
    """Upload ``path``; returns ``open_remote()``: (its reader, a function opening the slide)."""
    from pipeline.slides._remote_tiff import RemoteTiffSlide
    from pipeline.slides._s3range import S3RangeFile

    client, bucket = s3
    client.upload_file(str(path), bucket, key)

    def open_remote():
        reader = S3RangeFile(client, bucket, key)
        return reader, lambda: RemoteTiffSlide(reader, None, 2**31)

    return open_remote


@pytest.mark.integration
def test_remote_many_directories_refused_like_local_in_a_few_requests(s3, many_ifds):
    reader, open_remote = _upload(s3, many_ifds, "ifds.tiff")()
    with pytest.raises(SlideOpenError) as ei:
        open_remote().close()
    assert f"more than {MAX_TIFF_DIRECTORIES} TIFF directories" in str(ei.value)
    # 65 directories of ~150 bytes after the 256 x 256 level: a few 8 KiB header blocks.
    assert reader.requests <= 6 and reader.bytes_fetched <= 64 * 1024, (
        reader.requests,
        reader.bytes_fetched,
    )
    with pytest.raises(SlideOpenError):  # the same verdict from the local reader
        open_slide(many_ifds).close()


@pytest.mark.integration
def test_remote_huge_tile_refused_like_local(s3, tmp_path):
    p = _huge_tile_tiff(tmp_path / "tile.tiff", 65536)
    _, open_remote = _upload(s3, p, "tile.tiff")()
    with pytest.raises(SlideTooLargeError, match=r"65536x65536 px tiles.*decode budget"):
        open_remote().close()
    with pytest.raises(SlideTooLargeError):
        open_slide(p).close()


@pytest.mark.integration
def test_remote_jpeg_tile_declaring_other_dimensions_is_not_decoded(s3, tmp_path):
    # libjpeg allocates what the JPEG declares (20000 x 20000 px: 1.2 GB) whatever the TIFF says.
    p = _jpeg_tile_tiff(tmp_path / "sof.tiff", 20000)
    reopen = _upload(s3, p, "sof.tiff")
    with reopen()[1]() as rem, pytest.raises(SlideReadError) as ei:
        rem.read(0, (0, 0, 64, 64))
    assert "JPEG declares 20000x20000 px, expected the TIFF tile size 64x64" in str(ei.value)
    with open_slide(p) as loc, pytest.raises(SlideReadError, match="20000x20000"):
        loc.read(0, (0, 0, 64, 64))
    with reopen()[1]() as rem:  # the other tiles are fine
        assert rem.read(0, (64, 64, 128, 128)).shape == (64, 64, 3)


@pytest.mark.integration
def test_remote_header_reads_are_budgeted(s3):
    from pipeline.slides._s3range import S3RangeFile

    client, bucket = s3
    client.put_object(Bucket=bucket, Key="blob.bin", Body=b"\0" * 200_000)
    f = S3RangeFile(client, bucket, "blob.bin", max_header_bytes=64 * 1024)
    assert len(f.read(40_000)) == 40_000
    with pytest.raises(SlideReadError, match="header reads exceed 65536 bytes"):
        f.read(100_000)
    assert f.bytes_fetched <= 64 * 1024
