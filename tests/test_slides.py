"""Slide backends: real OpenSlide fixtures, generated pyramidal TIFFs, plain images."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline.errors import ConfigError, SlideError, SlideReadError, SlideTooLargeError
from pipeline.slides import Slide, open_slide

pytestmark = pytest.mark.unit


def _gradient(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack(
        [(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), np.full_like(xx, 90)], -1
    ).astype(np.uint8)


def _write_pyramid(path, base: np.ndarray, n_levels: int, mpp: float | None, compression=None):
    with tifffile.TiffWriter(path) as tw:
        img = base
        for i in range(n_levels):
            kw = {}
            if mpp is not None:
                r = 1e4 / (mpp * 2**i)
                kw = {"resolution": (r, r), "resolutionunit": "CENTIMETER"}
            tw.write(
                img,
                tile=(64, 64),
                photometric="rgb",
                compression=compression,
                metadata=None,
                subfiletype=0 if i == 0 else 1,
                **kw,
            )
            img = img[::2, ::2].copy()


@pytest.fixture
def pyramid(tmp_path):
    base = _gradient(400, 300)
    p = tmp_path / "pyr.tiff"
    _write_pyramid(p, base, 3, mpp=0.25)
    return p, base


def test_generated_pyramid_levels_mpp_and_pixels(pyramid):
    path, base = pyramid
    with open_slide(path) as s:
        assert isinstance(s, Slide)
        assert s.format == "openslide:generic-tiff"
        assert s.level_count == 3
        assert s.level_dimensions == ((400, 300), (200, 150), (100, 75))
        assert s.dimensions == (400, 300)
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert s.mpp == pytest.approx(0.25)
        assert s.mpp_source == "metadata"
        a = s.read(0, (10, 20, 110, 70))
        assert a.shape == (50, 100, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, base[20:70, 10:110])
        # Level coordinates are the level's own pixels.
        b = s.read(1, (5, 5, 25, 15))
        np.testing.assert_array_equal(b, base[::2, ::2][5:15, 5:25])
        # Outside the slide: white.
        c = s.read(2, (90, 70, 110, 80))
        assert c.shape == (10, 20, 3)
        assert (c[:, 10:] == 255).all() and (c[5:, :] == 255).all()
        np.testing.assert_array_equal(c[:5, :10], base[::2, ::2][::2, ::2][70:75, 90:100])


def test_metadata_mpp_wins_and_user_mpp_is_fallback(tmp_path, pyramid):
    path, _ = pyramid
    with open_slide(path, mpp=0.5) as s:
        assert (s.mpp, s.mpp_source) == (pytest.approx(0.25), "metadata")
    nompp = tmp_path / "nompp.tiff"
    _write_pyramid(nompp, _gradient(256, 256), 2, mpp=None)
    with open_slide(nompp) as s:
        assert (s.mpp, s.mpp_source) == (None, None)
    with open_slide(nompp, mpp=0.3) as s:
        assert (s.mpp, s.mpp_source) == (0.3, "user")
    with pytest.raises(ConfigError, match="--mpp"):
        open_slide(nompp, mpp=-1)


def test_openslide_fixture_svs(shared_data):
    with open_slide(shared_data / "openslide_fixtures" / "small.svs") as s:
        assert s.format == "openslide:aperio"
        assert s.level_dimensions == ((16, 16),)
        assert (s.mpp, s.mpp_source) == (pytest.approx(0.499), "metadata")
        a = s.read(0, (0, 0, 16, 16))
        assert a.shape == (16, 16, 3) and a.dtype == np.uint8
        assert a.std() > 0  # real image content, not a blank


def test_openslide_fixture_generic_tiff_matches_png(shared_data):
    fx = shared_data / "openslide_fixtures"
    with open_slide(fx / "boxes.tiff") as s:
        assert s.format == "openslide:generic-tiff"
        assert s.level_count == 4
        assert s.level_dimensions[0] == (300, 250)
        assert s.level_dimensions[1] == (150, 125)
        # 72 dpi written by an image tool is not a microscope scale: treated as absent.
        assert s.mpp is None
        full = s.read(0, (0, 0, 300, 250))
        assert full.shape == (250, 300, 3)
        top = s.read(3, (0, 0) + s.level_dimensions[3])
        assert top.shape == (31, 37, 3)
    ref = np.asarray(Image.open(fx / "boxes.png").convert("RGB"))
    assert ref.shape == full.shape
    assert np.abs(ref.astype(int) - full.astype(int)).mean() < 8  # JPEG-compressed pyramid


@pytest.mark.parametrize("name", ["boxes_0.dcm", "boxes_1.dcm"])
def test_openslide_fixture_dicom(shared_data, name):
    with open_slide(shared_data / "openslide_fixtures" / name) as s:
        assert s.format == "openslide:dicom"
        assert s.level_count >= 1
        w, h = s.dimensions
        assert (w, h) == (16, 16)
        assert s.mpp == pytest.approx(0.499)
        a = s.read(0, (0, 0, w, h))
        assert a.shape == (h, w, 3) and a.dtype == np.uint8


def test_plain_images(tmp_path):
    base = _gradient(120, 80)
    for ext, kw in ((".png", {}), (".bmp", {}), (".jpg", {"quality": 95}), (".tif", {})):
        p = tmp_path / f"field{ext}"
        Image.fromarray(base).save(p, **kw)
        with open_slide(p) as s:
            assert s.format.startswith("image:")
            assert s.level_dimensions == ((120, 80),) and s.level_downsamples == (1.0,)
            a = s.read(0, (-5, 0, 20, 10))
            assert a.shape == (10, 25, 3) and (a[:, :5] == 255).all()
            tol = 6 if ext == ".jpg" else 0
            assert np.abs(a[:, 5:].astype(int) - base[:10, :20]).max() <= tol


def test_plain_tiff_resolution_gives_mpp(tmp_path):
    p = tmp_path / "cam.tif"
    Image.fromarray(_gradient(64, 64)).save(p, dpi=(25400 / 0.2, 25400 / 0.2))  # 0.2 µm/px
    with open_slide(p, mpp=1.0) as s:
        assert s.mpp == pytest.approx(0.2, rel=1e-3) and s.mpp_source == "metadata"


def test_rgba_png_composited_on_white(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:5, :, 3] = 255  # top half opaque red-ish, bottom transparent
    p = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(p)
    with open_slide(p) as s:
        a = s.read(0, (0, 0, 10, 10))
    assert (a[:5] == (200, 0, 0)).all()
    assert (a[5:] == 255).all()


def test_read_limit_and_closed_slide(pyramid):
    path, _ = pyramid
    s = open_slide(path, max_pixels=1000)
    with s:
        s.read(0, (0, 0, 10, 10))
        with pytest.raises(SlideTooLargeError, match="pyr.tiff"):
            s.read(0, (0, 0, 100, 100))
        with pytest.raises(ValueError, match="level"):
            s.read(5, (0, 0, 1, 1))
    with pytest.raises(ValueError, match="closed"):
        s.read(0, (0, 0, 1, 1))


def test_unreadable_svs_is_a_read_error(shared_data):
    p = shared_data / "openslide_fixtures" / "unreadable.svs"
    with open_slide(p) as s, pytest.raises(SlideReadError) as ei:
        s.read(0, (0, 0, 16, 16))
    assert str(ei.value).startswith(str(p) + ": ")
    assert isinstance(ei.value, SlideError) and isinstance(ei.value, OSError)


def test_exif_orientation_is_applied(tmp_path):
    base = _gradient(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    p = tmp_path / "rotated.jpg"
    Image.fromarray(base).save(p, exif=exif, quality=95)
    with open_slide(p) as s:
        assert s.dimensions == (40, 60)
        a = s.read(0, (0, 0, 40, 60))
    expected = np.rot90(base, k=-1)
    assert np.abs(a.astype(int) - expected.astype(int)).mean() < 4
