"""Zone map of a whole blood smear: glass / thick end / monolayer / feathered edge.

A hematologist reads a smear in its monolayer, where red cells just touch; the thick end (cells
piled) and the feathered edge (sparse, flattened cells) distort white-cell morphology, and glass
holds nothing. :func:`zone_map` classifies a slide at a few µm/px from its own pyramid, so the
job can read level 0 only where it describes cells (:meth:`ZoneMap.region_boxes`).

The rule (thresholds are :class:`ZoneSettings` fields, a user may set them):

1. **Map level**: the coarsest pyramid level whose µm/px is at most ``map_um`` (4 µm/px by
   default; a 40x scan's 16x level), reduced by an integer factor towards ``map_um`` when finer.
2. **Optical density**: ``OD = sum over R, G, B of -ln(I / glass)``, glass being the most
   common colour (4-level bins) among the brightest ``glass_percentile`` % of the map (clear
   glass is the brightest large uniform part of a smear scan; the mode ignores the few
   brighter JPEG and noise pixels).
3. **Red-cell OD calibration** (stain- and scanner-independent): about ``calib_tiles`` (256)
   windows of ``calib_window_px`` px are read at the coarsest level of at most ``calib_um``
   µm/px (where red cells are resolved), centred on the stained map px that fall on a square
   lattice sized to put that many nodes on the stained area (so they spread evenly in two
   dimensions over every zone), all of them read; where they lie over two 256-px tiles
   apart, each is moved by at most half its side to lie within one tile (a remote read
   fetches whole tiles). In each, pixels with ``OD > stain_od`` are
   stained. A window is *monolayer-like* when its stained fraction lies in ``calib_fraction``
   (0.4-0.8: cells touching with glass between them; the thick end is covered beyond it, the
   feathered edge's sparse cells below it) and its widest glass gap (radius of the largest
   unstained disc) lies in ``calib_gap_um`` (4-12 µm: none means piled cells, a wider one the
   smear's outline, a gap or the feathered edge). Each gives the median OD of its stained
   pixels, and ``c``, one red cell's OD, is the **mode** of those values (kernel 4 % wide,
   refined to the median within 8 % of the peak).

   Why a mode: the window values fall in clusters a factor ~1.5 apart by zone (feathered-edge
   cells, flattened and paler, read 0.67 of the monolayer's; thick-end cells piled beside
   glass 1.6x; the monolayer's within +-5 %), and a percentile over all windows lands
   between two clusters wherever their counts put it: 30th percentile over windows picked
   every k-th stained px in raster order (they lined up in a few columns) read one slide's
   ``c`` 20 % low, and a change of 0.3 % of its px moved it 23 %. Over 28 tuning slides (4
   sources, 10-40 % monolayer, stain x0.6-1.5, 0.2-0.5 µm/px) the new ``c`` is within
   -0.3..+2.1 % of the median over the truth's pure-monolayer windows and moves at most 0.53 %
   when the slide's white cells are removed or thinned (the old rule: up to 23 %), at most
   1.2 % when the lattice itself changes (230-300 windows).
4. **Glass**: a map px is glass where the OD smoothed over ``glass_smooth_um`` is below
   ``glass_max`` red-cell equivalents, or where it lies outside the stained px closed
   (dilate, then erode) over ``glass_close_um``: the closing bridges the gaps between sparse
   feathered-edge cells without growing a straight outline, where a blur would spread the
   smear ~1.5 sigma onto the glass.
5. **Density**: the map's OD averaged over ``smooth_um`` (Gaussian sigma) **over the smear
   only** (normalised convolution: glass px carry no weight, so density does not ramp down
   towards the outline and gaps, which drew a ring of monolayer round the thick end), divided
   by ``c``: red-cell equivalents ``rho`` (1.0 = one layer of cells).
6. **Zone**: outside glass, ``rho < feathered_max`` (0.43) feathered edge, ``< monolayer_max``
   (0.92) monolayer, else thick. Measured ``rho`` reads low where cells pile (averaging happens
   on light, not on OD), so the thresholds are set on measured ``rho``, between the measured
   ranges of adjacent zones of the generator (:mod:`pipeline.whole_smear`, one stain per
   slide), re-checked with this calibration on 28 tuning slides (2nd-98th percentile:
   feathered edge 0.13-0.45, monolayer 0.47-0.85, thick end from 0.99): 0.43 / 0.92 give the
   best mean area agreement there (0.980; any pair within 0.42-0.45 / 0.92-0.96 is within
   0.0005 of it), and 0.979 (worst slide 0.969) on 20 held-back slides.

Texture is not used: at 4 µm/px a red cell is two pixels, and the thick end's overlap shows as
density above one layer, which the rule reads directly.

Local red-cell density at a point (:meth:`ZoneMap.density_at`) is ``rho`` (fraction of area
covered, in single-cell layers) and ``rho / RBC_AREA_UM2 * 1000`` cells per 1000 µm² (nominal
7.5 µm red cell).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError, PipelineError

__all__ = [
    "GLASS",
    "THICK",
    "MONOLAYER",
    "FEATHERED",
    "ZONE_NAMES",
    "RBC_AREA_UM2",
    "ZoneSettings",
    "ZoneMap",
    "ZoneError",
    "zone_map",
    "zone_map_level",
    "zone_map_from_path",
    "agreement",
    "render_labels_png",
]

GLASS, THICK, MONOLAYER, FEATHERED = 0, 1, 2, 3
#: Zone names by label code.
ZONE_NAMES: tuple[str, ...] = ("glass", "thick", "monolayer", "feathered")
#: Nominal red-cell area (7.5 µm disc), µm².
RBC_AREA_UM2 = math.pi / 4 * 7.5**2
#: Calibration: kernel width (ln units, ~4 %) of the mode of the window values. The zones'
#: clusters lie a factor ~1.5 apart (feathered edge 0.67, thick end with glass 1.6 of the
#: monolayer's) and the monolayer's windows within +-5 % of their centre.
_MODE_BANDWIDTH = 0.04
#: Fewer monolayer-like windows than this (a tiny or nearly cell-free slide): every window with
#: 5-80 % stained px counts (the mode still takes the largest cluster).
_MIN_CALIB_WINDOWS = 5
#: Tile side calibration windows are kept inside (px of the calibration level): a scanner's
#: 256-px JPEG tiles, fetched whole by a remote read.
CALIB_TILE_PX = 256
_COLOURS = np.array([(232, 232, 236), (140, 28, 48), (52, 160, 84), (236, 176, 52)], np.uint8)


class ZoneError(PipelineError, ValueError):
    """A slide cannot be zoned (no scale, nothing stained); the message names the slide."""


@dataclass(frozen=True)
class ZoneSettings:
    """Thresholds and scales of the zone rule (see the module docstring)."""

    map_um: float = 4.0
    calib_um: float = 1.2
    calib_tiles: int = 256
    calib_window_px: int = 128
    calib_fraction: tuple[float, float] = (0.4, 0.8)
    calib_gap_um: tuple[float, float] = (4.0, 12.0)
    stain_od: float = 0.15
    glass_percentile: float = 30.0
    smooth_um: float = 25.0
    glass_smooth_um: float = 10.0
    glass_max: float = 0.04
    glass_close_um: float = 24.0
    feathered_max: float = 0.43
    monolayer_max: float = 0.92

    def __post_init__(self) -> None:
        def pos(name: str, lo: float, hi: float) -> None:
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not (math.isfinite(v) and lo <= v <= hi)
            ):
                raise ConfigError(
                    f"ZoneSettings.{name} must be a number in [{lo}, {hi}], got {v!r}"
                )

        pos("map_um", 0.5, 64.0)
        pos("calib_um", 0.1, 4.0)
        pos("stain_od", 0.01, 3.0)
        pos("glass_percentile", 0.5, 90.0)
        pos("smooth_um", 0.0, 2000.0)
        pos("glass_smooth_um", 0.0, 2000.0)
        pos("glass_max", 0.0, 10.0)
        pos("glass_close_um", 0.0, 2000.0)
        pos("feathered_max", 0.0, 10.0)
        pos("monolayer_max", 0.0, 10.0)
        for name, lo, hi in (("calib_tiles", 1, 1000), ("calib_window_px", 32, 4096)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ConfigError(
                    f"ZoneSettings.{name} must be an integer in [{lo}, {hi}], got {v!r}"
                )
        for name, top in (("calib_fraction", 1.0), ("calib_gap_um", 1000.0)):
            cf = getattr(self, name)
            if not (
                isinstance(cf, tuple)
                and len(cf) == 2
                and all(
                    isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                    for v in cf
                )
                and 0.0 <= cf[0] < cf[1] <= top
            ):
                raise ConfigError(
                    f"ZoneSettings.{name} must be (lo, hi) with 0 <= lo < hi <= {top:g}, got {cf!r}"
                )
        if not self.glass_max < self.feathered_max < self.monolayer_max:
            raise ConfigError(
                "ZoneSettings.glass_max < feathered_max < monolayer_max must hold, got "
                f"{self.glass_max}, {self.feathered_max}, {self.monolayer_max}"
            )


def _zone_codes(zones: Iterable[str] | str) -> list[int]:
    if isinstance(zones, str):
        zones = [zones]
    codes = []
    for z in zones:
        if z not in ZONE_NAMES:
            raise ConfigError(f"--zones: unknown zone {z!r} (choose from {', '.join(ZONE_NAMES)})")
        codes.append(ZONE_NAMES.index(z))
    return codes


@dataclass(frozen=True)
class ZoneMap:
    """A slide's zone map.

    ``labels``: (h, w) uint8 codes of :data:`ZONE_NAMES`; ``um_per_px``: its µm per raster px;
    ``scale``: level-0 px per raster px; ``density``: (h, w) float32 red-cell equivalents;
    ``cell_od``: the calibrated single red-cell OD; ``width``/``height``: level-0 px;
    ``mpp``: level-0 µm/px; ``level``: the pyramid level it was read from.
    """

    labels: np.ndarray
    um_per_px: float
    scale: float
    density: np.ndarray
    cell_od: float
    width: int
    height: int
    mpp: float
    level: int
    settings: ZoneSettings

    def areas_mm2(self) -> dict[str, float]:
        """Area of each zone in mm² (inside the slide)."""
        px = (self.um_per_px / 1000.0) ** 2
        counts = np.bincount(self.labels.ravel(), minlength=len(ZONE_NAMES))
        return {n: round(float(counts[i] * px), 4) for i, n in enumerate(ZONE_NAMES)}

    def _raster(self, x: float, y: float) -> tuple[int, int]:
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"point ({x!r}, {y!r}) is not finite")
        h, w = self.labels.shape
        return min(max(int(y / self.scale), 0), h - 1), min(max(int(x / self.scale), 0), w - 1)

    def zone_at(self, x: float, y: float) -> str:
        """Zone name at level-0 px ``(x, y)`` (clamped to the slide)."""
        return ZONE_NAMES[int(self.labels[self._raster(x, y)])]

    def density_at(self, x: float, y: float) -> dict[str, float]:
        """Local red-cell density at level-0 px ``(x, y)``: ``coverage`` (red-cell layers over
        the smoothing window) and ``cells_per_1000um2`` (nominal 7.5 µm cells)."""
        rho = float(self.density[self._raster(x, y)])
        return {
            "coverage": round(rho, 4),
            "cells_per_1000um2": round(rho / RBC_AREA_UM2 * 1000.0, 3),
        }

    def region_boxes(
        self,
        zones: Iterable[str] | str = ("monolayer",),
        tile_px: int = 4096,
        margin_um: float = 0.0,
    ) -> list[tuple[int, int, int, int]]:
        """Level-0 ``(x0, y0, x1, y1)`` tiles of ``tile_px`` (grid from the origin, clipped to the
        slide) that hold any raster px of ``zones`` (grown by ``margin_um``); every other tile
        (glass, excluded zones) is left out, so it need never be read at level 0."""
        if isinstance(tile_px, bool) or not isinstance(tile_px, int) or tile_px < 16:
            raise ConfigError(f"tile_px must be an integer >= 16, got {tile_px!r}")
        if not (isinstance(margin_um, int | float) and math.isfinite(margin_um) and margin_um >= 0):
            raise ConfigError(f"margin_um must be >= 0 µm, got {margin_um!r}")
        mask = np.isin(self.labels, _zone_codes(zones))
        if margin_um > 0 and mask.any():
            import cv2

            r = int(math.ceil(margin_um / self.um_per_px))
            mask = cv2.dilate(mask.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0
        h, w = mask.shape
        out = []
        for y0 in range(0, self.height, tile_px):
            y1 = min(y0 + tile_px, self.height)
            ry0, ry1 = (
                int(y0 / self.scale),
                min(h, max(int(y0 / self.scale) + 1, math.ceil(y1 / self.scale))),
            )
            row = mask[ry0:ry1]
            if not row.any():
                continue
            for x0 in range(0, self.width, tile_px):
                x1 = min(x0 + tile_px, self.width)
                rx0 = int(x0 / self.scale)
                rx1 = min(w, max(rx0 + 1, math.ceil(x1 / self.scale)))
                if row[:, rx0:rx1].any():
                    out.append((x0, y0, x1, y1))
        return out

    def selected_fraction(
        self, zones: Iterable[str] | str = ("monolayer",), tile_px: int = 4096
    ) -> float:
        """Fraction of the slide's level-0 area inside :meth:`region_boxes`."""
        boxes = self.region_boxes(zones, tile_px)
        return sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes) / float(self.width * self.height)

    def labels_on(self, shape: tuple[int, int]) -> np.ndarray:
        """The labels resampled (nearest) onto a raster of ``shape`` covering the same slide."""
        gh, gw = shape
        h, w = self.labels.shape
        ys = np.minimum(
            ((np.arange(gh) + 0.5) * self.height / gh / self.scale).astype(np.int64), h - 1
        )
        xs = np.minimum(
            ((np.arange(gw) + 0.5) * self.width / gw / self.scale).astype(np.int64), w - 1
        )
        return self.labels[ys[:, None], xs[None, :]]

    def png(self, max_side: int = 512, points: Sequence[tuple[float, float]] = ()) -> bytes:
        """A small PNG of the map (``points``: level-0 px drawn as dark dots, e.g. cells)."""
        pts = [(x / self.scale, y / self.scale) for x, y in points]
        return render_labels_png(self.labels, max_side, pts)

    def summary(self) -> dict:
        """JSON-ready: per-zone areas (mm²), raster µm/px, calibrated cell OD, settings."""
        from dataclasses import asdict

        return {
            "areas_mm2": self.areas_mm2(),
            "um_per_px": self.um_per_px,
            "cell_od": round(self.cell_od, 4),
            "level": self.level,
            "settings": asdict(self.settings),
        }


def render_labels_png(
    labels: np.ndarray, max_side: int = 512, points: Sequence[tuple[float, float]] = ()
) -> bytes:
    """PNG bytes of a zone raster (glass light grey, thick dark red, monolayer green, feathered
    amber), at most ``max_side`` px on its longer side; ``points`` in raster px as dark dots."""
    from PIL import Image

    h, w = labels.shape
    k = max(1, math.ceil(max(h, w) / max_side))
    small = labels[k // 2 :: k, k // 2 :: k]
    rgb = _COLOURS[np.minimum(small, len(_COLOURS) - 1)]
    for x, y in points:
        cy, cx = int(y / k), int(x / k)
        rgb[max(cy - 1, 0) : cy + 2, max(cx - 1, 0) : cx + 2] = (20, 20, 90)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def agreement(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Area agreement of two label rasters of one shape: ``overall`` (fraction of px equal) and
    ``per_zone`` (of each truth zone's area, the fraction labelled the same; None when absent)."""
    if pred.shape != truth.shape:
        raise ValueError(f"raster shapes differ: {pred.shape} vs {truth.shape}")
    per = {}
    for i, n in enumerate(ZONE_NAMES):
        t = truth == i
        per[n] = round(float((pred[t] == i).mean()), 4) if t.any() else None
    return {"overall": round(float((pred == truth).mean()), 4), "per_zone": per}


# --------------------------------------------------------------------------- classification
def _pick_level(slide, um: float) -> int:
    best = 0
    for lv in range(slide.level_count):
        if slide.level_mpp(lv) <= um * 1.01:
            best = lv
    return best


def _read_reduced(slide, level: int, k: int) -> np.ndarray:
    """``level`` reduced by area averaging by ``k`` (1: as is), read in windows."""
    import cv2

    w, h = slide.level_dimensions[level]
    gw, gh = max(1, w // k), max(1, h // k)
    out = np.empty((gh, gw, 3), np.uint8)
    win = max(k, (2048 // k) * k)
    for y in range(0, gh * k, win):
        for x in range(0, gw * k, win):
            x1, y1 = min(x + win, gw * k), min(y + win, gh * k)
            a = slide.read(level, (x, y, x1, y1))
            out[y // k : y1 // k, x // k : x1 // k] = (
                a
                if k == 1
                else cv2.resize(a, ((x1 - x) // k, (y1 - y) // k), interpolation=cv2.INTER_AREA)
            )
    return out


def _glass(rgb: np.ndarray, percentile: float) -> np.ndarray:
    """Glass colour: the most common colour (4-level bins) of the brightest ``percentile`` %."""
    # Integer sums, histograms and bin counts: a 5 GP slide's 4 µm map is 20 MP, and float or
    # int64 copies of it would cost more than the map itself.
    lum = rgb.sum(axis=2, dtype=np.uint16)
    hist = np.cumsum(np.bincount(lum.ravel(), minlength=766))
    cut = int(np.searchsorted(hist, hist[-1] * (1.0 - percentile / 100.0)))
    px = rgb[lum >= cut]
    del lum
    key = (
        (px[:, 0] // 4).astype(np.int32) << 12
        | (px[:, 1] // 4).astype(np.int32) << 6
        | (px[:, 2] // 4).astype(np.int32)
    )
    top = px[key == int(np.argmax(np.bincount(key, minlength=1 << 18)))]
    return np.maximum(np.median(top.astype(np.float32), axis=0), 1.0)


def _od(rgb: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """Summed optical density of uint8 RGB against ``glass``, float32 (by table: no float
    copies of the three channels)."""
    v = np.arange(256, dtype=np.float32)
    luts = [-np.log(np.clip(v / np.float32(g), 1e-3, 1.0)).astype(np.float32) for g in glass]
    od = luts[0].take(rgb[..., 0])
    od += luts[1].take(rgb[..., 1])
    od += luts[2].take(rgb[..., 2])
    return od


def _calibration_centres(stained: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Map px ``(ys, xs)`` of about ``n`` calibration windows, and the lattice spacing (map px):
    the stained px among the nodes of a square lattice whose spacing puts ~``n`` nodes on the
    stained area, so the windows spread evenly in two dimensions over every zone in proportion
    to its area.

    Not every k-th stained px in raster order: that step is nearly a multiple of the smear's
    row length, so the windows lined up in a few columns (zones run along x) and which columns
    they hit moved with a handful of px anywhere on the slide (one slide: 62 of 160 windows in
    5 % of the smear's length, the red-cell OD 7 % off after 0.3 % of its px changed)."""
    h, w = stained.shape
    count = int(stained.sum(dtype=np.int64))
    g = max(1.0, math.sqrt(count / max(n, 1)))
    ry = np.minimum((np.arange(g / 2, h, g)).astype(np.int64), h - 1)
    rx = np.minimum((np.arange(g / 2, w, g)).astype(np.int64), w - 1)
    iy, ix = np.nonzero(stained[ry[:, None], rx[None, :]])
    ys, xs = ry[iy], rx[ix]
    if len(ys) > 2 * n:  # an odd shape put far more nodes on it than its area says: bound reads
        keep = np.linspace(0, len(ys) - 1, 2 * n).astype(np.int64)
        ys, xs = ys[keep], xs[keep]
    return ys, xs, g


def _mode(vals: Sequence[float], bandwidth: float) -> float:
    """The densest value of ``vals`` (Gaussian kernel of ``bandwidth`` in ln units), refined to
    the median of the values within two bandwidths of it: one cluster's centre, which a minority
    of windows from another cluster cannot pull (a percentile or mean would follow them)."""
    lv = np.log(np.asarray(vals, np.float64))
    grid = np.linspace(lv.min(), lv.max(), 256)
    dens = np.exp(-0.5 * ((grid[:, None] - lv[None, :]) / bandwidth) ** 2).sum(axis=1)
    peak = grid[int(np.argmax(dens))]
    near = lv[np.abs(lv - peak) <= 2 * bandwidth]
    return float(np.exp(np.median(near)))


def _calibrate(
    slide, od_map: np.ndarray, scale: float, glass: np.ndarray, s: ZoneSettings
) -> float:
    """One red-cell layer's OD ``c`` for this slide (see the module docstring, step 3)."""
    import cv2

    lv = _pick_level(slide, s.calib_um)
    ds = slide.level_downsamples[lv]
    um = slide.level_mpp(lv)
    lw, lh = slide.level_dimensions[lv]
    where = str(slide.path)
    stained = od_map > s.stain_od
    if not stained.any():
        raise ZoneError(f"{where}: nothing stained on the slide (all glass at OD > {s.stain_od})")
    ys, xs, spacing = _calibration_centres(stained, s.calib_tiles)
    # Windows further apart than two tiles each fetch their own tiles remotely: keep each in one.
    # Closer ones share tiles anyway, and moving them would stack them in the same few tiles (a
    # small slide's windows then sample the same px: one 1.8 x 0.9 mm slide's monolayer
    # agreement fell from 0.96 to 0.90).
    snap = spacing * scale / ds >= 2 * CALIB_TILE_PX
    del stained
    vals, loose = [], []
    half = s.calib_window_px // 2
    for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
        cx, cy = (x + 0.5) * scale / ds, (y + 0.5) * scale / ds
        x0 = _in_tile(cx - half, s.calib_window_px, lw, snap)
        y0 = _in_tile(cy - half, s.calib_window_px, lh, snap)
        x1, y1 = min(x0 + s.calib_window_px, lw), min(y0 + s.calib_window_px, lh)
        od = _od(slide.read(lv, (x0, y0, x1, y1)), glass)
        st = od > s.stain_od
        frac = float(st.mean())
        if frac < 0.05 or frac > s.calib_fraction[1]:
            continue  # glass, or cells piled with no glass between them (thick end)
        v = float(np.median(od[st]))
        # The widest glass gap (radius, µm): none means cells pile (the thick end's pale side
        # passes the fraction test under a weak stain); a wide one means the window straddles
        # the smear's outline, a gap or the feathered edge. A fraction below the range means
        # sparse cells: the feathered edge, whose flattened cells are paler.
        gap = float(cv2.distanceTransform((~st).astype(np.uint8), cv2.DIST_L2, 5).max()) * um
        if frac >= s.calib_fraction[0] and s.calib_gap_um[0] <= gap <= s.calib_gap_um[1]:
            vals.append(v)
        else:
            loose.append(v)
    vals = vals if len(vals) >= _MIN_CALIB_WINDOWS else vals + loose
    if not vals:
        raise ZoneError(f"{where}: no window with separate red cells to calibrate the red-cell OD")
    return _mode(vals, _MODE_BANDWIDTH)


def _in_tile(start: float, window: int, length: int, snap: bool = True) -> int:
    """First px of a ``window``-px calibration window that starts near ``start`` on a level
    ``length`` px long; with ``snap``, moved (by at most half the window) to lie within the
    :data:`CALIB_TILE_PX` tile holding its centre when the window fits in one: a window straddling
    tiles makes a remote read fetch 2-4 JPEG tiles instead of one (0.019 of a 5 GP object
    for 256 windows, 2.2 tiles each)."""
    lo = int(min(max(start, 0), max(length - window, 0)))
    if not snap or window > CALIB_TILE_PX:
        return lo
    t0 = int(start + window / 2) // CALIB_TILE_PX * CALIB_TILE_PX
    x0 = min(max(lo, t0), t0 + CALIB_TILE_PX - window)
    return int(min(max(x0, 0), max(length - window, 0)))


def zone_map_level(slide, settings: ZoneSettings | None = None) -> int:
    """The pyramid level :func:`zone_map` reads whole: the coarsest at most ``map_um`` µm/px
    (level 0 of a slide without a coarser level)."""
    return _pick_level(slide, (settings or ZoneSettings()).map_um)


def zone_map(slide, settings: ZoneSettings | None = None) -> ZoneMap:
    """Zone map of an open :class:`pipeline.slides.Slide` (see the module docstring).

    Reads the map level whole (in windows) plus about ``calib_tiles`` small windows at about
    ``calib_um`` µm/px; never level 0 unless the slide has no coarser level. Raises
    :class:`ZoneError` for a slide without a scale or with nothing stained.
    """
    import cv2

    s = settings or ZoneSettings()
    if not isinstance(s, ZoneSettings):
        raise ConfigError(f"settings must be ZoneSettings, got {type(s).__name__}")
    if slide.mpp is None:
        raise ZoneError(f"{slide.path}: no µm/px scale (give --mpp) so zones cannot be sized")
    lv = _pick_level(slide, s.map_um)
    k = max(1, int(s.map_um / slide.level_mpp(lv) + 1e-6))
    rgb = _read_reduced(slide, lv, k)
    scale = slide.level_downsamples[lv] * k
    um = slide.mpp * scale
    glass = _glass(rgb, s.glass_percentile)
    od = _od(rgb, glass)
    del rgb
    cell_od = _calibrate(slide, od, scale, glass, s)

    def blur(a: np.ndarray, um_: float) -> np.ndarray:
        sigma = um_ / um
        if sigma < 0.3:
            return a
        return cv2.GaussianBlur(a, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)

    # In-place steps and early frees: at 5 GP each float map is ~80 MB.
    glass_at = blur(od, s.glass_smooth_um) < s.glass_max * cell_od
    if s.glass_close_um > 0:
        # Smoothing spreads the smear past its outline (by ~1.5 sigma where cells are dense), so
        # the outline is taken from the stained px themselves, closed over glass_close_um to
        # bridge the gaps between sparse feathered-edge cells: closing fills gaps but does not
        # grow a straight edge.
        r = max(1, int(round(s.glass_close_um / um)))
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        stained = (od > s.stain_od).astype(np.uint8)
        closed = cv2.morphologyEx(stained, cv2.MORPH_CLOSE, disc, borderType=cv2.BORDER_REPLICATE)
        del stained
        glass_at |= closed == 0
        del closed
    # Density is averaged over the smear only (normalised convolution): a plain blur would
    # ramp down towards the outline and gaps, drawing a ring of monolayer round the thick end
    # and of feathered edge round the monolayer.
    smear = (~glass_at).astype(np.float32)
    od *= smear
    rho = blur(od, s.smooth_um)
    del od
    weight = blur(smear, s.smooth_um)
    del smear
    np.maximum(weight, 1e-3, out=weight)
    rho /= weight
    del weight
    rho /= np.float32(cell_od)
    rho[glass_at] = 0.0
    labels = np.full(rho.shape, THICK, np.uint8)
    labels[rho < s.monolayer_max] = MONOLAYER
    labels[rho < s.feathered_max] = FEATHERED
    labels[glass_at] = GLASS
    w0, h0 = slide.dimensions
    return ZoneMap(labels, um, scale, rho, cell_od, w0, h0, float(slide.mpp), lv, s)


def zone_map_from_path(
    path, settings: ZoneSettings | None = None, mpp: float | None = None
) -> ZoneMap:
    """Open a local slide with :func:`pipeline.slides.open_slide` and zone it."""
    from pipeline.slides import open_slide

    with open_slide(path, mpp=mpp) as slide:
        return zone_map(slide, settings)
