"""Whole-smear generator (pipeline.whole_smear): real pyramid files, truth, streaming, bad specs."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, PipelineError
from pipeline.slides import open_slide
from pipeline.whole_smear import (
    DEFAULT_DATA_DIR,
    SmearSpec,
    WholeSmearError,
    _Layout,
    _load_library,
    _reaches,
    _ring_zone,
    _wbc_mask,
    build_whole_smear,
)
from pipeline.zones import GLASS, MONOLAYER, ZONE_NAMES

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(
        not (DEFAULT_DATA_DIR / "txl_pbc").is_dir(), reason="shared data not present"
    ),
]

# 1.6 x 0.8 mm at 0.25 µm/px: 6,400 x 3,200 px = 20 MP.
_SMALL = dict(width_mm=1.6, height_mm=0.8)


@pytest.fixture(scope="module")
def svs(tmp_path_factory):
    return build_whole_smear(
        tmp_path_factory.mktemp("ws"), SmearSpec(**_SMALL, seed=11, source="pbc")
    )


def test_svs_pyramid_opens_with_scale_and_4x_levels(svs):
    with open_slide(svs.path) as s:
        assert s.format == "openslide:aperio"
        assert s.mpp == pytest.approx(0.25)
        assert s.dimensions == (6400, 3200)
        assert s.level_count >= 3
        assert [round(d) for d in s.level_downsamples[:3]] == [1, 4, 16]
        px = s.read(2, (0, 0, *s.level_dimensions[2]))
    # Glass at the corner, stained smear in the middle row.
    assert px[2, 2].mean() > 180
    mid = px[px.shape[0] // 2].astype(float).mean(axis=1)
    assert mid.min() < px[2, 2].mean() - 30


def test_truth_lists_white_cells_types_and_zone_areas(svs):
    truth = json.loads(svs.truth_path.read_text())
    assert truth["mpp"] == 0.25 and truth["width"] == 6400
    cells = truth["wbcs"]
    assert len(cells) == svs.n_wbc > 5
    for c in cells:
        x0, y0, x1, y1 = c["box"]
        assert 0 <= x0 < x1 <= 6400 and 0 <= y0 < y1 <= 3200
        assert c["zone"] in ZONE_NAMES[1:]
    # PBC fields have one typed white cell each (WBCAtt label).
    assert sum(c["type"] is not None for c in cells) >= 0.8 * len(cells)
    areas = truth["zones"]["areas_mm2"]
    assert sum(areas.values()) == pytest.approx(1.6 * 0.8, rel=0.01)
    assert areas["monolayer"] == pytest.approx(0.3 * 1.28, rel=0.2)  # gaps cut into it
    labels = np.load(svs.zones_path)["labels"]
    assert labels.shape == (200, 400)  # 4 µm/px
    assert (svs.truth_path.parent / "smear_11.zones.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_white_cells_are_drawn_where_the_truth_says(svs):
    truth = json.loads(svs.truth_path.read_text())
    with open_slide(svs.path) as s:
        darker = 0
        for c in truth["wbcs"]:
            x0, y0, x1, y1 = c["box"]
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            crop = s.read(0, (cx - 6, cy - 6, cx + 6, cy + 6)).astype(float)
            # Nucleus or cytoplasm: bluer than red cells (B >= R - 20) or dark.
            darker += crop[..., 2].mean() >= crop[..., 0].mean() - 20 or crop.mean() < 150
    assert darker >= 0.9 * len(truth["wbcs"])


def test_tiff_variant_and_same_seed_same_truth(tmp_path):
    spec = SmearSpec(width_mm=0.8, height_mm=0.5, seed=3, source="bccd", fmt="tiff")
    a = build_whole_smear(tmp_path / "a", spec)
    b = build_whole_smear(tmp_path / "b", spec)
    with open_slide(a.path) as s:
        assert s.format == "openslide:generic-tiff" and s.mpp == pytest.approx(0.25)
    ta, tb = (json.loads(p.truth_path.read_text()) for p in (a, b))
    ta.pop("seconds"), tb.pop("seconds")
    assert ta == tb
    assert a.path.read_bytes()[:4] == b"II+\x00"  # BigTIFF


def test_level0_is_streamed_not_held(tmp_path):
    # 51 MP (146 MiB of RGB at level 0); the generator's fixed costs (cell library, one chunk,
    # the noise strip) are about 60 MiB whatever the slide's size.
    spec = SmearSpec(width_mm=3.2, height_mm=1.0, seed=5, source="kaggle", wbc_per_mm2=10.0)
    level0_bytes = spec.width_px * spec.height_px * 3
    tracemalloc.start()
    try:
        build_whole_smear(tmp_path, spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < level0_bytes / 2, (
        f"peak {peak / 2**20:.0f} MiB vs level 0 {level0_bytes / 2**20:.0f} MiB"
    )


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"monolayer_fraction": 0.6, "thick_fraction": 0.2}, "monolayer_fraction"),
        ({"width_mm": float("nan")}, "width_mm"),
        ({"mpp": 0}, "mpp"),
        ({"source": "../etc"}, "source"),
        ({"fmt": "png"}, "fmt"),
        ({"seed": -1}, "seed"),
        ({"n_gaps": True}, "n_gaps"),
        ({"jpeg_quality": 101}, "jpeg_quality"),
    ],
)
def test_bad_spec_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        SmearSpec(**kw)


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 101, "a b"])
def test_bad_name_is_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="plain file stem"):
        build_whole_smear(tmp_path, SmearSpec(width_mm=0.3, height_mm=0.3), name=name)
    assert not any(Path(tmp_path).parent.glob("x.*"))


def test_missing_data_is_one_line_error(tmp_path):
    with pytest.raises(WholeSmearError, match="source_map.csv: not found") as ei:
        build_whole_smear(tmp_path / "o", SmearSpec(width_mm=0.3, height_mm=0.3), data_dir=tmp_path)
    assert isinstance(ei.value, PipelineError) and "\n" not in str(ei.value)


# --------------------------------------------------------------------------- one stain per slide
def _chroma_spread(vectors: np.ndarray, pct: float) -> float:
    """``pct`` percentile of the L1 distance of each OD vector's chroma to the median chroma."""
    ch = vectors / vectors.sum(axis=1, keepdims=True)
    return float(np.percentile(np.abs(ch - np.median(ch, axis=0)).sum(axis=1), pct))


def test_red_cell_sprites_of_a_kaggle_slide_share_one_stain():
    # Kaggle BCD fields are augmented in brightness and hue: cut as they are, the sprites of one
    # slide had red cells of many stains (per-field chroma p90 0.157, strength p90/p10 2.63).
    lib = _load_library(DEFAULT_DATA_DIR, "kaggle", "val", 0.25, np.random.default_rng(5))
    by_field: dict[str, list[np.ndarray]] = {}
    for sp in lib.rbc[MONOLAYER]:
        od = sp.od.reshape(-1, 3).astype(np.float64)
        t = od.sum(axis=1)
        by_field.setdefault(sp.origin, []).append(od[t >= np.median(t[t > 0])].mean(axis=0))
    med = np.array([np.median(v, axis=0) for v in by_field.values() if len(v) >= 3])
    assert len(med) >= 20
    assert _chroma_spread(med, 90) <= 0.10
    strength = med.sum(axis=1)
    assert np.percentile(strength, 90) / np.percentile(strength, 10) <= 1.6
    assert lib.stain is not None and lib.stain.nucleus is not None
    assert lib.fields_unmapped == 0


def test_white_cells_on_a_kaggle_slide_share_one_stain(tmp_path):
    # End to end, on the written (JPEG) slide: the darkest fifth of each truth white cell's box
    # (its nucleus, the detector's rule). Old generator: 80th percentile 0.26-0.30 L1.
    spec = SmearSpec(**_SMALL, seed=5, source="kaggle", wbc_per_mm2=60.0)
    sm = build_whole_smear(tmp_path, spec)
    truth = json.loads(sm.truth_path.read_text())
    with open_slide(sm.path) as s:
        glass = s.read(2, (0, 0, 40, 40)).reshape(-1, 3).astype(np.float64).mean(axis=0)
        nuclei = []
        for c in truth["wbcs"]:
            px = s.read(0, tuple(c["box"])).reshape(-1, 3).astype(np.float64)
            od = -np.log(np.clip(px / glass, 1e-3, 1.0))
            t = od.sum(axis=1)
            nuclei.append(od[t >= np.percentile(t, 80)].mean(axis=0))
    assert len(nuclei) >= 20
    assert _chroma_spread(np.array(nuclei), 80) <= 0.12
    st = truth["stain"]
    assert st["reference_field"] and len(st["rbc_od"]) == 3 and len(st["nucleus_od"]) == 3


def test_same_seed_same_stain_and_pixels(tmp_path):
    spec = SmearSpec(width_mm=0.8, height_mm=0.5, seed=7, source="kaggle")
    a = build_whole_smear(tmp_path / "a", spec)
    b = build_whole_smear(tmp_path / "b", spec)
    ta, tb = (json.loads(p.truth_path.read_text()) for p in (a, b))
    assert ta["stain"] == tb["stain"] and ta["wbcs"] == tb["wbcs"]
    with open_slide(a.path) as sa, open_slide(b.path) as sb:
        box = (0, 0, *sa.dimensions)
        assert np.array_equal(sa.read(0, box), sb.read(0, box))


# --------------------------------------------------------------------------- sprites and truth
def test_white_cell_mask_leaves_out_the_fields_cut_red_cells():
    # A 40 x 40 sprite: the white cell's box in the middle, one red cell beside it (inside the
    # sprite's ellipse, outside the cell) and one lying on the cell's edge.
    m = _wbc_mask((40, 40), (10.0, 10.0, 30.0, 30.0), [(28.0, 14.0, 38.0, 24.0)])
    assert m[20, 20] == pytest.approx(1.0)  # the white cell is drawn
    assert m[19, 35] < 0.05  # the red cell beside it is not (the slide's own show there)
    assert m[0, 0] == 0.0 and m[20, 2] > 0.9  # outside the ellipse / the field's glass rim
    # Where that red cell overlaps the white cell, the white cell (on top) stays.
    assert m[19, 28] > 0.9


def test_a_white_cell_touching_another_is_no_sprite():
    b = (100.0, 100.0, 120.0, 120.0)
    assert _reaches(b, (120.5, 105.0, 140.0, 125.0), 1.1)  # side by side: in the grown ellipse
    assert not _reaches(b, (121.5, 121.5, 140.0, 140.0), 1.1)  # only the corner: outside it
    assert not _reaches(b, (130.0, 100.0, 150.0, 120.0), 1.1)


def test_ring_zone_follows_the_pipelines_rule_at_the_smear_edge():
    # The smear (all monolayer) from x = 1000 and y = 1000. A cell in its corner, 10 and 20 px
    # inside, is in the monolayer by its centre, but 8 of its 12 ring points (r = 240 px) lie
    # on glass; one 20 px inside the top edge only keeps 7 of 12 in the monolayer.
    lay = _Layout((1000, 3000), 0.0, (1000.0, 1000.5, 100000.0, 100001.0), ())
    assert lay.zone_rho(np.array([1010.0]), np.array([1020.0]))[0][0] == MONOLAYER
    assert _ring_zone(lay, 1010.0, 1020.0, 240.0) == GLASS
    assert _ring_zone(lay, 5000.0, 1020.0, 240.0) == MONOLAYER


def test_truth_cells_carry_their_ring_zone(svs):
    truth = json.loads(svs.truth_path.read_text())
    assert all(c["ring_zone"] in ZONE_NAMES for c in truth["wbcs"])
    assert "ring_zone" in truth["cell_zone_rule"]


def test_stain_gain_darkens_the_cells_and_is_checked(tmp_path):
    """A stain gain scales the cells' optical density (darker slide), and a bad one names the field."""
    from pipeline.errors import ConfigError
    from pipeline.slides import open_slide

    def mean_od(gain: float) -> float:
        spec = SmearSpec(width_mm=0.6, height_mm=0.4, seed=7, source="pbc", stain_gain=gain)
        sm = build_whole_smear(tmp_path / str(gain), spec)
        with open_slide(sm.path) as slide:
            w, h = slide.dimensions
            rgb = slide.read(0, (0, 0, w, h)).astype(np.float64)
        od = -np.log(np.clip(rgb / 255.0, 1e-3, 1.0)).sum(axis=2)
        return float(od[od > 0.3].mean())

    assert mean_od(1.5) > 1.2 * mean_od(1.0)

    with pytest.raises(ConfigError, match="stain_gain"):
        SmearSpec(stain_gain=0.0)
    with pytest.raises(ConfigError, match="stain_gain"):
        SmearSpec(stain_gain=float("nan"))
