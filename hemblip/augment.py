"""Training-time augmentation of cell crops: what other slides, stains and scanners make of a cell.

Applied on the fly to the training split only (:class:`hemblip.train._Batches` with
``augment=True``), with a NumPy generator seeded by (seed, epoch, rank), so a run is repeatable.
Each kind can be switched on or off (``--augment KIND,...``):

* ``geometry``: random 90° rotation, mirror, and a shift of the crop centre by up to
  ``shift`` x its side (the detector's centre is not the annotator's).
* ``scale``: the field of view is ``crop_um x f`` µm, ``f`` uniform in ``[1 - scale, 1 + scale]``:
  exactly what the job cuts when a slide's scale is off by that factor (its crop is
  ``crop_um / mpp`` px of the slide). The training crops are cut ``context`` times wider than the
  job's (``TrainConfig.context``), so zooming out shows real smear; past that, mirrored smear.
* ``stain``: hue rotation by up to ``hue`` of the colour circle, saturation x ``saturation``,
  brightness and contrast x ``brightness`` (see :class:`AugmentSettings` for why these ranges).
* ``resolution``: with probability ``resolution_p``, the crop is resampled to what a scan at
  ``resolution_mpp`` µm/px holds for the same field (``crop_um x f / mpp`` px, OpenCV area) and
  back up (cubic), as the job does for a 40x slide. A no-op where the working image is already
  coarser than that (the demo model's 112 px input is 0.32 µm/px for 36 µm).
* ``jpeg``: with probability ``jpeg_p``, a JPEG round trip at quality ``jpeg_quality``
  (scanners store their tiles as JPEG).

Order: optics and stain first (scale, stain), then orientation, then the scanner (resolution,
JPEG), as the physical path of a slide goes.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from hemblip.crops import CROP_UM, cell_crop
from hemblip.errors import HemblipConfigError

__all__ = ["KINDS", "DEFAULT_KINDS", "AugmentSettings", "parse_kinds", "augment_crop"]

KINDS = ("geometry", "scale", "stain", "resolution", "jpeg")
DEFAULT_KINDS = KINDS


def parse_kinds(value: object) -> tuple[str, ...]:
    """``"scale,stain"`` / ``("scale",)`` / ``True`` (all) / ``False`` or ``"none"`` (none) -> kinds.

    HemblipConfigError naming ``--augment`` for an unknown kind.
    """
    if value is True:
        return DEFAULT_KINDS
    if value is False or value is None:
        return ()
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list | tuple):
        items = [str(v).strip() for v in value]
    else:
        raise HemblipConfigError(
            f"--augment must be a comma-separated list of {', '.join(KINDS)} "
            f"or 'none', got {value!r}"
        )
    if items in (["none"], []):
        return ()
    if items == ["all"]:
        return DEFAULT_KINDS
    bad = [v for v in items if v not in KINDS]
    if bad:
        raise HemblipConfigError(
            f"--augment: unknown kind(s) {', '.join(map(repr, bad))}; "
            f"choose from {', '.join(KINDS)} (or 'none', 'all')"
        )
    return tuple(k for k in KINDS if k in items)


def _pair(flag: str, value: object, lo: float, hi: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise HemblipConfigError(f"{flag} must be two numbers LO,HI, got {value!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and lo <= a <= b <= hi):
        raise HemblipConfigError(
            f"{flag} must satisfy {lo:g} <= LO <= HI <= {hi:g}, got {a:g},{b:g}"
        )
    return a, b


@dataclass(frozen=True)
class AugmentSettings:
    """Ranges of the augmentations; messages of invalid values name the CLI flag.

    Why these defaults:

    * ``scale`` 0.2: slide scales are written by scanners and can be off (objective swapped,
      scale estimated from red cells, whose diameter itself varies ~±10 %); ±20 % is the
      robustness the product promises (issue 12).
    * ``hue`` 0.04 of the circle (±14°): Wright-Giemsa and May-Grünwald-Giemsa smears differ
      mainly in how blue-violet the nuclei and basophilic cytoplasm are and how pink the red cells
      are; between stains, batches and staining times that is a shift of a few to ~15° of hue.
      Much more (±0.1) would turn eosinophil orange-red granules towards neutrophil lilac or
      basophil purple, which are the labels (granule_colour, cytoplasm_colour, cell type) the
      model must read from colour.
    * ``saturation`` x0.8-1.2: stain concentration, staining time and smear thickness make
      smears paler or more intense without changing which colour a granule has.
    * ``brightness`` 0.1: illumination and scanner white balance.
    * ``resolution_mpp`` 0.22-0.28 µm/px: the 40x scanners' native scales (about 0.23-0.27).
    * ``jpeg_quality`` 70-95: the qualities scanners write their tiles with (70 is the low end
      the job is evaluated at).
    """

    kinds: tuple[str, ...] = DEFAULT_KINDS
    crop_um: float = CROP_UM
    shift: float = 0.04
    scale: float = 0.2
    hue: float = 0.04
    saturation: tuple[float, float] = (0.8, 1.2)
    brightness: float = 0.1
    resolution_mpp: tuple[float, float] = (0.22, 0.28)
    resolution_p: float = 0.5
    jpeg_quality: tuple[float, float] = (70, 95)
    jpeg_p: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", parse_kinds(self.kinds))
        for flag, v, hi in (
            ("--aug-scale", self.scale, 0.5),
            ("--aug-hue", self.hue, 0.5),
            ("--aug-shift", self.shift, 0.25),
            ("--aug-brightness", self.brightness, 0.5),
            ("--aug-resolution-p", self.resolution_p, 1.0),
            ("--aug-jpeg-p", self.jpeg_p, 1.0),
        ):
            if not (
                isinstance(v, int | float)
                and not isinstance(v, bool)
                and math.isfinite(v)
                and 0 <= v <= hi
            ):
                raise HemblipConfigError(f"{flag} must be a number in [0, {hi:g}], got {v!r}")
        if not (
            isinstance(self.crop_um, int | float)
            and math.isfinite(self.crop_um)
            and 0 < self.crop_um <= 500
        ):
            raise HemblipConfigError(
                f"crop_um must be a number of µm in (0, 500], got {self.crop_um!r}"
            )
        object.__setattr__(self, "saturation", _pair("--aug-saturation", self.saturation, 0.0, 3.0))
        object.__setattr__(
            self, "resolution_mpp", _pair("--aug-resolution-mpp", self.resolution_mpp, 0.01, 5.0)
        )
        q = _pair("--aug-jpeg", self.jpeg_quality, 1, 100)
        object.__setattr__(self, "jpeg_quality", (int(q[0]), int(q[1])))

    def to_json(self) -> dict:
        return {
            "kinds": list(self.kinds),
            "crop_um": self.crop_um,
            "shift": self.shift,
            "scale": self.scale,
            "hue": self.hue,
            "saturation": list(self.saturation),
            "brightness": self.brightness,
            "resolution_mpp": list(self.resolution_mpp),
            "resolution_p": self.resolution_p,
            "jpeg_quality": list(self.jpeg_quality),
            "jpeg_p": self.jpeg_p,
        }

    @classmethod
    def from_json(cls, d: dict) -> AugmentSettings:
        d = dict(d)
        for k in ("kinds", "saturation", "resolution_mpp", "jpeg_quality"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def centre_field(image: np.ndarray, context: float, out_px: int) -> np.ndarray:
    """The job's field (``1 / context`` of ``image``'s side, centred) resampled to ``out_px``:
    what a crop cut ``context`` times wider shows at the job's framing."""
    h = image.shape[0]
    # Scale chosen so that the field is CROP_UM µm: keeps cell_crop's µm bounds for any image size.
    return cell_crop(
        image, (image.shape[1] / 2, h / 2), CROP_UM * context / h, crop_um=CROP_UM, crop_px=out_px
    )


def stain_jitter(
    image: np.ndarray, hue: float, saturation: float, brightness: float = 1.0, contrast: float = 1.0
) -> np.ndarray:
    """Hue rotated by ``hue`` (fraction of the circle, signed), saturation x ``saturation``,
    then brightness and contrast factors; (H, W, 3) uint8 RGB in and out."""
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV_FULL).astype(np.float32)
    hsv[..., 0] = np.mod(hsv[..., 0] + hue * 256.0, 256.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
    rgb = cv2.cvtColor(np.clip(np.rint(hsv), 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB_FULL)
    if brightness == 1.0 and contrast == 1.0:
        return rgb
    img = rgb.astype(np.float32) * brightness
    mean = img.mean()
    img = (img - mean) * contrast + mean
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def degrade_resolution(image: np.ndarray, field_um: float, mpp: float) -> np.ndarray:
    """``image`` (a ``field_um`` µm square) as a scan at ``mpp`` µm/px gives it: resampled to
    ``round(field_um / mpp)`` px (area) and back to its size (cubic). Unchanged when it already
    has no more px than that."""
    import cv2

    side = image.shape[0]
    n = max(2, int(round(field_um / mpp)))
    if n >= side:
        return image
    small = cv2.resize(image, (n, n), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC)


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """``image`` encoded as JPEG at ``quality`` (1-100) and decoded again."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def augment_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    settings: AugmentSettings,
    *,
    context: float = 1.0,
    out_px: int | None = None,
) -> tuple[np.ndarray, dict]:
    """One random augmentation of a training crop.

    ``image``: (S, S, 3) uint8, a square of ``context x settings.crop_um`` µm around the cell
    (``context`` >= 1: cut wider so that zooming out shows real smear). Returns the augmented
    ``(out_px, out_px, 3)`` uint8 crop (default ``out_px``: ``S / context``) of the job's framing
    and a dict of the parameters drawn (``f``: field-of-view factor, ``shift``: px, ``hue``,
    ``saturation``, ``brightness``, ``contrast``, ``rot90``, ``flip``, ``resolution_mpp``,
    ``jpeg_quality``; None where a kind is off), which tests use to check the ranges.
    """
    s = settings
    side = image.shape[0]
    if out_px is None:
        out_px = max(2, int(round(side / context)))
    kinds = set(s.kinds)
    drawn: dict = dict.fromkeys(
        (
            "f",
            "shift",
            "hue",
            "saturation",
            "brightness",
            "contrast",
            "rot90",
            "flip",
            "resolution_mpp",
            "jpeg_quality",
        )
    )
    # Every kind draws its numbers whether on or off, so switching one off leaves the others'
    # draws (and a run's other augmentations) unchanged.
    f = float(rng.uniform(1.0 - s.scale, 1.0 + s.scale))
    dx, dy = (float(v) for v in rng.uniform(-s.shift, s.shift, 2))
    hue = float(rng.uniform(-s.hue, s.hue))
    sat = float(rng.uniform(*s.saturation))
    bri = float(rng.uniform(1.0 - s.brightness, 1.0 + s.brightness))
    con = float(rng.uniform(1.0 - s.brightness, 1.0 + s.brightness))
    k = int(rng.integers(4))
    flip = bool(rng.random() < 0.5)
    res_on = bool(rng.random() < s.resolution_p)
    res_mpp = float(rng.uniform(*s.resolution_mpp))
    jpeg_on = bool(rng.random() < s.jpeg_p)
    quality = int(rng.integers(s.jpeg_quality[0], s.jpeg_quality[1] + 1))

    field = side / context  # px of the job's field in this image
    if "scale" not in kinds:
        f = 1.0
    else:
        drawn["f"] = f
    cx, cy = image.shape[1] / 2, side / 2
    if "geometry" in kinds:
        cx, cy = cx + dx * field * f, cy + dy * field * f
        drawn["shift"] = (dx * field * f, dy * field * f)
    # The image's own scale (µm/px) with the job's field = crop_um: cell_crop cuts
    # round(field x f) px around the (shifted) centre, mirrored past the border, and resamples.
    img = cell_crop(image, (cx, cy), s.crop_um / field, crop_um=s.crop_um * f, crop_px=out_px)
    if "stain" in kinds:
        img = stain_jitter(img, hue, sat, bri, con)
        drawn.update(hue=hue, saturation=sat, brightness=bri, contrast=con)
    if "geometry" in kinds:
        img = np.rot90(img, k=k)
        if flip:
            img = img[:, ::-1]
        img = np.ascontiguousarray(img)
        drawn.update(rot90=k, flip=flip)
    if "resolution" in kinds and res_on:
        img = degrade_resolution(img, s.crop_um * f, res_mpp)
        drawn["resolution_mpp"] = res_mpp
    if "jpeg" in kinds and jpeg_on:
        img = jpeg_roundtrip(img, quality)
        drawn["jpeg_quality"] = quality
    return img, drawn
