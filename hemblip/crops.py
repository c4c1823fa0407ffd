"""The one crop of a white cell: a fixed physical field of view around its centre.

Training, evaluation, ``hemblip caption --framing cell`` and the job (``pipeline.detect``) all cut
a cell's crop with this module, so the model meets at serving time exactly the framing and the
resampling it learned on:

* :func:`crop_box`: the square of side ``round(crop_um / mpp)`` px whose corner is
  ``floor(centre - side / 2)`` (px of the image, x1/y1 exclusive);
* :func:`resample`: that square to ``crop_px`` with OpenCV, ``INTER_AREA`` when shrinking and
  ``INTER_CUBIC`` when enlarging;
* :func:`cell_crop`: both, on an in-memory image, filling what lies past the image border by
  mirroring the image (``pad="reflect"``: dataset fields are cut out of a smear, so smear is
  what surrounds them) or with white (``pad="white"``: glass, as the job reads outside a slide);
* :func:`thumbnail_jpeg`: the job's thumbnail of a crop (bilinear to ``px``, JPEG quality 85);
* :func:`centre_offset`: where the crop's centre goes. A cell's centre comes from different
  places on the two paths (a dataset's label box, the job's detector at a coarser level; they
  differ by 0.8 µm median, 2.8 µm p90 on the PBC cells), and the model is sensitive to it (PBC
  val cell type 0.78 vs 0.84 between the two on the same cells). Both paths therefore move the
  centre they have onto the cell's nucleus seen in the first square (the stained object nearest
  the centre), which brings them within 0.1 µm (median; p90 0.2 µm) of each other.

The job reads the square through its slide reader (``crop_box`` then ``slide.read``, white
outside the slide), moves its centre by :func:`centre_offset` and reads again, then calls
:func:`resample`; an in-memory image gives the same pixels through ``cell_crop(..., pad="white")``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

from hemblip.errors import HemblipConfigError

__all__ = [
    "CROP_UM",
    "CROP_PX",
    "PADS",
    "MAX_SQUARE_PX",
    "crop_box",
    "crop_side_px",
    "resample",
    "cell_crop",
    "centre_offset",
    "pad_fraction",
    "thumbnail_jpeg",
]

#: The job's default crop: side in µm and the px it is resampled to.
CROP_UM = 36.0
CROP_PX = 224
#: :func:`centre_offset`: the grid it works on (µm/px), the farthest it moves a centre (µm), the
#: smallest nucleus (µm²) and the radius (µm) that joins a segmented nucleus's lobes.
_CENTRE_MPP = 0.5
MAX_CENTRE_SHIFT_UM = 8.0
_MIN_NUCLEUS_UM2 = 4.0
_LOBE_JOIN_UM = 1.5
#: A nucleus stains blue-violet (blue well above green); red cells, glass, eosinophil granules
#: and most cytoplasm do not. The Otsu threshold of (B - G) over the square, never below this.
_MIN_STAIN = 25
#: How :func:`cell_crop` fills what lies past the image border.
PADS = ("reflect", "white")
_MAX_MPP = 50.0  # µm/px; the job's DetectConfig bound
#: Largest square :func:`cell_crop` cuts from an in-memory image (px a side; 8192 px = 192 MiB);
#: a larger one is a wrong scale, not a cell. The job bounds its reads with the slide's limits.
MAX_SQUARE_PX = 8192


def _check(mpp: object, crop_um: object, crop_px: object) -> tuple[float, float, int]:
    def num(v: object) -> bool:
        return (
            isinstance(v, int | float | np.floating | np.integer)
            and not isinstance(v, bool)
            and math.isfinite(v)
        )

    if not (num(mpp) and 0 < float(mpp) <= _MAX_MPP):
        raise HemblipConfigError(
            f"mpp must be a scale in µm/px within (0, {_MAX_MPP:g}], got {mpp!r}"
        )
    if not (num(crop_um) and 0 < float(crop_um) <= 500):
        raise HemblipConfigError(f"crop_um must be a number of µm in (0, 500], got {crop_um!r}")
    if not (
        isinstance(crop_px, int | np.integer)
        and not isinstance(crop_px, bool)
        and 16 <= crop_px <= 4096
    ):
        raise HemblipConfigError(f"crop_px must be an integer in [16, 4096], got {crop_px!r}")
    return float(mpp), float(crop_um), int(crop_px)


def crop_side_px(mpp: float, crop_um: float = CROP_UM) -> int:
    """Side in px of the ``crop_um`` µm square at ``mpp`` µm/px: ``max(2, round(crop_um / mpp))``."""
    mpp, crop_um, _ = _check(mpp, crop_um, CROP_PX)
    return max(2, int(round(crop_um / mpp)))


def crop_box(
    center_xy: Sequence[float], mpp: float, crop_um: float = CROP_UM
) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` px (x1/y1 exclusive) of the ``crop_um`` µm square centred on
    ``center_xy`` (px, float) in an image of ``mpp`` µm/px; may reach past the image."""
    try:
        cx, cy = (float(v) for v in center_xy)
    except (TypeError, ValueError):
        raise HemblipConfigError(
            f"center must be two numbers (x, y) in px, got {center_xy!r}"
        ) from None
    if not (math.isfinite(cx) and math.isfinite(cy)):
        raise HemblipConfigError(f"center must be finite px, got {center_xy!r}")
    side = crop_side_px(mpp, crop_um)
    x0, y0 = int(math.floor(cx - side / 2)), int(math.floor(cy - side / 2))
    return x0, y0, x0 + side, y0 + side


def resample(square: np.ndarray, crop_px: int = CROP_PX) -> np.ndarray:
    """``square`` ((S, S, 3) uint8) resampled to ``(crop_px, crop_px, 3)`` uint8: OpenCV
    ``INTER_AREA`` when ``S >= crop_px``, else ``INTER_CUBIC`` (the job's rule)."""
    import cv2

    side = square.shape[1]
    interp = cv2.INTER_AREA if side >= crop_px else cv2.INTER_CUBIC
    return cv2.resize(square, (crop_px, crop_px), interpolation=interp)


def _rgb(image: object) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise HemblipConfigError(f"image: expected an (H, W, 3) uint8 array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise HemblipConfigError(f"image: expected dtype uint8, got {arr.dtype}")
    return arr[:, :, :3]


def _mirror(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices mirrored into [0, n) (edge pixel repeated: ... 1 0 | 0 1 ... n-1 | n-1 n-2 ...),
    however far outside they lie."""
    m = np.mod(idx, 2 * n)
    return np.where(m < n, m, 2 * n - 1 - m)


def _square(
    img: np.ndarray, center_xy: Sequence[float], mpp: float, crop_um: float, pad: str
) -> np.ndarray:
    """The native-resolution ``crop_um`` square of ``img`` centred on ``center_xy`` (see cell_crop)."""
    x0, y0, x1, y1 = crop_box(center_xy, mpp, crop_um)
    if x1 - x0 > MAX_SQUARE_PX:
        raise HemblipConfigError(
            f"a {crop_um:g} µm crop at {mpp:g} µm/px is {x1 - x0} px a side, over "
            f"{MAX_SQUARE_PX} px: the scale is wrong"
        )
    h, w = img.shape[:2]
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        return np.ascontiguousarray(img[y0:y1, x0:x1])
    if pad == "white":
        square = np.full((y1 - y0, x1 - x0, 3), 255, np.uint8)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if cx1 > cx0 and cy1 > cy0:
            square[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = img[cy0:cy1, cx0:cx1]
        return square
    ys = _mirror(np.arange(y0, y1), h)
    xs = _mirror(np.arange(x0, x1), w)
    return np.ascontiguousarray(img[ys[:, None], xs[None, :]])


def centre_offset(square: np.ndarray, mpp: float) -> tuple[float, float]:
    """``(dx, dy)`` px (of ``square``) from the centre of ``square`` ((S, S, 3) uint8, the crop
    square around a cell's approximate centre at ``mpp`` µm/px) to the centroid of the cell's
    nucleus: the stained (B - G above Otsu, at least ``_MIN_STAIN``) object nearest the centre,
    lobes joined, at least 4 µm², at most :data:`MAX_CENTRE_SHIFT_UM` away. ``(0, 0)`` when
    there is none. Worked on a 0.5 µm/px copy, so it costs the same at any scan resolution."""
    import cv2
    from scipy import ndimage as ndi

    sq = _rgb(square)
    side = sq.shape[0]
    f = float(mpp) / _CENTRE_MPP
    n = max(8, int(round(side * f)))
    interp = cv2.INTER_AREA if n < side else cv2.INTER_LINEAR
    small = cv2.resize(np.ascontiguousarray(sq), (n, n), interpolation=interp).astype(np.int16)
    score = small[..., 2] - small[..., 1]
    hist = np.bincount((np.clip(score, -255, 255) + 255).ravel(), minlength=511).astype(np.float64)
    p = hist / hist.sum()
    w0 = np.cumsum(p)
    mu = np.cumsum(p * np.arange(511))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1.0 - w0))
    thr = max(int(np.nanargmax(np.nan_to_num(between, nan=-1.0))) - 255, _MIN_STAIN)
    r = max(1, int(round(_LOBE_JOIN_UM / _CENTRE_MPP)))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    mask = cv2.morphologyEx((score > thr).astype(np.uint8), cv2.MORPH_CLOSE, disk)
    lab, nlab = ndi.label(mask)
    if nlab == 0:
        return 0.0, 0.0
    idx = np.arange(1, nlab + 1)
    areas = np.asarray(ndi.sum(mask, lab, idx)) * _CENTRE_MPP**2
    cents = np.asarray(ndi.center_of_mass(mask, lab, idx), dtype=np.float64).reshape(
        -1, 2
    )  # (y, x)
    c = (n - 1) / 2.0
    dist = np.hypot(cents[:, 0] - c, cents[:, 1] - c) * _CENTRE_MPP
    ok = (areas >= _MIN_NUCLEUS_UM2) & (dist <= MAX_CENTRE_SHIFT_UM)
    if not ok.any():
        return 0.0, 0.0
    cy, cx = cents[int(np.argmin(np.where(ok, dist, np.inf)))]
    return float((cx - c) / f), float((cy - c) / f)


def cell_crop(
    image: np.ndarray,
    center_xy: Sequence[float],
    mpp: float,
    *,
    crop_um: float = CROP_UM,
    crop_px: int = CROP_PX,
    pad: str = "reflect",
    recentre: bool = True,
) -> np.ndarray:
    """The cell crop: ``(crop_px, crop_px, 3)`` uint8 of the ``crop_um`` µm square centred on
    ``center_xy`` (px of ``image``, (H, W, 3) uint8) at ``mpp`` µm/px, the centre first moved
    onto the cell's nucleus by :func:`centre_offset` (``recentre=False``: exactly at
    ``center_xy``).

    Square and corner as :func:`crop_box`, resampling as :func:`resample`. What lies past the
    image border is the image mirrored (``pad="reflect"``) or white (``pad="white"``, the job's
    reading of pixels outside a slide). Memory is bounded by the square, not the image.
    """
    if pad not in PADS:
        raise HemblipConfigError(f"pad must be one of {', '.join(PADS)}, got {pad!r}")
    mpp, crop_um, crop_px = _check(mpp, crop_um, crop_px)
    img = _rgb(image)
    square = _square(img, center_xy, mpp, crop_um, pad)
    if recentre:
        cx, cy = (float(v) for v in center_xy)
        dx, dy = centre_offset(square, mpp)
        if dx or dy:
            square = _square(img, (cx + dx, cy + dy), mpp, crop_um, pad)
    return resample(square, crop_px)


def pad_fraction(
    shape: Sequence[int], center_xy: Sequence[float], mpp: float, crop_um: float = CROP_UM
) -> float:
    """Share (0..1) of the crop square of :func:`crop_box` that lies outside an image of
    ``shape`` = (H, W, ...) px, i.e. that :func:`cell_crop` pads."""
    x0, y0, x1, y1 = crop_box(center_xy, mpp, crop_um)
    h, w = int(shape[0]), int(shape[1])
    inside = max(0, min(x1, w) - max(x0, 0)) * max(0, min(y1, h) - max(y0, 0))
    return 1.0 - inside / float((x1 - x0) * (y1 - y0))


def thumbnail_jpeg(crop: np.ndarray, px: int = 96) -> bytes:
    """The job's thumbnail of ``crop`` ((S, S, 3) uint8): resized to ``px`` x ``px`` (Pillow
    bilinear) unless already that size, as JPEG quality 85 bytes."""
    from PIL import Image

    im = Image.fromarray(crop)
    if im.width != px:
        im = im.resize((px, px), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()
