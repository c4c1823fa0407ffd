"""Whole-smear generator (pipeline.whole_smear): real pyramid files, truth, streaming, bad specs."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError, PipelineError
from pipeline.slides import open_slide
from pipeline.whole_smear import DEFAULT_DATA_DIR, SmearSpec, WholeSmearError, build_whole_smear
from pipeline.zones import ZONE_NAMES

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
