"""Red-cell rims chained to a white cell's nucleus (purple stains, e.g. Raabin's) are cut off.

In a purple stain the rims and overlaps of red cells pass the field's nucleus threshold and the
lobe rule chained them, with a touching white cell's nucleus, into one "nucleus" whose centroid
lay 7-88 µm from the cell (generated Raabin smears). These synthetic fields reproduce it: a
dark nucleus with a curved chain of overlapping purple-rimmed red cells leaving it.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from pipeline.detection import DetectorConfig, detect_wbc
from pipeline.detection._detector import _work_image, nucleus_candidates
from pipeline.errors import ConfigError

pytestmark = pytest.mark.unit

MPP = 0.25  # µm/px, a 40x scan's level 0
GLASS = np.array([221.0, 185.0, 178.0])  # colours sampled from a generated Raabin smear
BODY = -np.log(np.array([175.0, 135.0, 150.0]) / GLASS)  # optical density of a red cell
RIM = -np.log(np.array([125.0, 80.0, 120.0]) / GLASS)  # its dark purple rim
NUC = -np.log(np.array([87.0, 49.0, 96.0]) / GLASS)  # a lymphocyte's nucleus


def chained_field(nucleus_um: float = 4.0, n_chain: int = 6, chain: bool = True):
    """(rgb at MPP, nucleus centre px): a round nucleus of radius ``nucleus_um`` at the centre
    of a 100 µm field, a chain of ``n_chain`` overlapping red cells (7.5 µm, 1.5 µm purple
    rim) leaving it, and two rows of loose red cells at the top and bottom."""
    n = int(round(100.0 / MPP))
    px = 1.0 / MPP
    od = np.zeros((n, n, 3))
    yy, xx = np.mgrid[0:n, 0:n]
    c = n / 2
    rr = 3.75 * px

    def disc(x, y, r):
        return (xx - x) ** 2 + (yy - y) ** 2 <= r * r

    cells = []
    if chain:
        for k in range(n_chain):
            d = (nucleus_um + 3.75 - 0.8 + k * 6.8) * px  # the first overlaps the nucleus
            a = 0.3 + 0.25 * k
            cells.append((c + d * math.cos(a), c + d * math.sin(a)))
    for i in range(-5, 6):
        for j in (-5, 5):
            cells.append((c + i * 9.0 * px, c + j * 9.0 * px))
    for x, y in cells:
        outer, inner = disc(x, y, rr), disc(x, y, rr - 1.5 * px)
        od[outer & ~inner] += RIM
        od[inner] += BODY
    od[disc(c, c, nucleus_um * px)] = NUC
    rgb = np.clip(GLASS * np.exp(-od), 0, 255).astype(np.uint8)
    return cv2.GaussianBlur(rgb, (0, 0), 0.4 * px), (c, c)


def _nearest_um(dets, centre) -> float:
    return min(math.hypot(d.centroid[0] - centre[0], d.centroid[1] - centre[1]) for d in dets) * MPP


def test_chain_of_rims_does_not_move_the_cell_off_its_nucleus():
    rgb, centre = chained_field()
    dets = detect_wbc(rgb, MPP)
    assert dets, "the white cell was not detected"
    # Centroid-in-box matching: a 12 µm lymphocyte's box holds centroids up to ~6 µm off its
    # centre; the chained group's centroid lay 13 µm off.
    assert _nearest_um(dets, centre) < 2.0
    near = [d for d in dets if _nearest_um([d], centre) < 20.0]
    assert len(near) == 1, [(d.centroid, d.score) for d in near]


def test_without_the_split_the_chain_is_one_group_off_the_cell():
    # What the split repairs (chain_passes=0 is the detector before it): one group of rims and
    # nucleus, centroid off the cell, a poor fill of its box.
    rgb, centre = chained_field()
    cfg = DetectorConfig(chain_passes=0)
    img, scale = _work_image(rgb, MPP, cfg)
    _, _, labels, feats = nucleus_candidates(img, MPP / scale, cfg)
    fe = feats[labels[int(centre[1] * scale), int(centre[0] * scale)] - 1]
    assert fe["area_um2"] > cfg.chain_area_um2 and fe["fill"] < cfg.chain_min_fill
    assert _nearest_um(detect_wbc(rgb, MPP, cfg), centre) > 6.0


def test_compact_large_nucleus_is_not_cut():
    # A field whose scale is estimated 2-3x too coarse shows a nucleus at hundreds of µm²,
    # still filling its box: it stays one candidate, found as without the split.
    rgb, centre = chained_field(nucleus_um=10.0, chain=False)
    cfg = DetectorConfig()
    img, scale = _work_image(rgb, MPP, cfg)
    _, _, labels, feats = nucleus_candidates(img, MPP / scale, cfg)
    fe = feats[labels[int(centre[1] * scale), int(centre[0] * scale)] - 1]
    assert fe["area_um2"] == pytest.approx(math.pi * 100.0, rel=0.15)
    a = [(d.bbox, d.centroid) for d in detect_wbc(rgb, MPP)]
    b = [(d.bbox, d.centroid) for d in detect_wbc(rgb, MPP, DetectorConfig(chain_passes=0))]
    assert a == b and _nearest_um(detect_wbc(rgb, MPP), centre) < 1.0


@pytest.mark.parametrize(
    "kw, flag",
    [
        ({"chain_area_um2": 0.0}, "chain_area_um2"),
        ({"chain_min_fill": 1.5}, "chain_min_fill"),
        ({"chain_passes": -1}, "chain_passes"),
        ({"chain_passes": 1.0}, "chain_passes"),
        ({"chain_passes": True}, "chain_passes"),
    ],
)
def test_chain_settings_are_checked(kw, flag):
    with pytest.raises(ConfigError, match=f"DetectorConfig.{flag}"):
        DetectorConfig(**kw)


# -- the smear path's nucleus check (pipeline.detect._has_nucleus) -------------------------------
RED_CHROMA = np.array([0.246, 0.439, 0.314])  # a Kaggle slide's red cells (OD ÷ its sum)


def _tile_with(dark_chroma, dark_od: float = 1.6):
    """(rgb, bbox): glass, a field of red cells (OD 0.8 of RED_CHROMA) and, in ``bbox``, a
    dark spot of OD ``dark_od`` with chroma ``dark_chroma``."""
    glass = np.array([232.0, 226.0, 228.0])
    od = np.zeros((200, 200, 3))
    od[:, 80:] = 0.8 * RED_CHROMA
    od[90:110, 130:150] = dark_od * np.asarray(dark_chroma)
    rgb = np.clip(np.round(glass * np.exp(-od)), 0, 255).astype(np.uint8)
    return rgb, (120, 80, 160, 120)


def test_red_cell_overlap_with_the_red_cells_blue_share_is_not_a_nucleus():
    from pipeline.detect import NUCLEUS_CHROMA, _has_nucleus, _tile_stain

    # An overlap of two red cells seen darker and a little greener (a generated Kaggle smear's
    # false candidates: chroma 0.12-0.21 from the red cells, blue share 0.23-0.29).
    overlap = (0.235, 0.505, 0.26)
    assert np.abs(np.array(overlap) - RED_CHROMA).sum() > NUCLEUS_CHROMA
    rgb, box = _tile_with(overlap)
    ref, red = _tile_stain(rgb)
    assert np.abs(red - RED_CHROMA).sum() < 0.02
    assert not _has_nucleus(rgb, box, ref, red)
    # The coarse candidates' check (half the threshold) is colour distance only.
    assert _has_nucleus(rgb, box, ref, red, NUCLEUS_CHROMA / 2)
    # A purple nucleus (low blue share) is one.
    rgb, box = _tile_with((0.29, 0.53, 0.18))
    ref, red = _tile_stain(rgb)
    assert _has_nucleus(rgb, box, ref, red)
