"""Stain-agnostic colour features shared by detection, scale estimation and segmentation.

Romanowsky-type stains (Wright, Giemsa, May-Grünwald-Giemsa, Leishman) colour nuclei purple/blue
and red cells pink/grey. In optical density (OD = log(background / I)), a nucleus absorbs green
strongly and blue comparatively little, a red cell absorbs green weakly; ``OD_G - 0.5 OD_B`` (the
"nucleus feature") separates them across the four TXL-PBC sources better than hue or a fixed
haematoxylin vector, because it is relative to each image's own background.

The features the red-cell scale estimate also uses (``background_rgb``, ``optical_density``,
``nucleus_feature``, ``smooth``, ``otsu``) are defined once in :mod:`hemblip.scale` and imported
here, so the job and the dataset readers estimate a field's scale with the same code.
"""

from __future__ import annotations

import cv2
import numpy as np

from hemblip.scale import background_rgb, nucleus_feature, optical_density, otsu, smooth

__all__: list[str] = []
# re-exported for the detector and the segmenter
_SHARED = (background_rgb, nucleus_feature, optical_density, otsu, smooth)


def check_rgb(rgb: object, name: str = "rgb") -> np.ndarray:
    """:func:`hemblip.scale.check_rgb` raising pipeline's :class:`~pipeline.errors.ConfigError`."""
    from hemblip.errors import HemblipConfigError
    from hemblip.scale import check_rgb as _check
    from pipeline.errors import ConfigError

    try:
        return _check(rgb, name)
    except HemblipConfigError as exc:
        raise ConfigError(str(exc)) from None


def disk(radius_px: float) -> np.ndarray:
    r = max(int(round(radius_px)), 0)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def cell_threshold(total: np.ndarray, frac: float = 0.4) -> float:
    """Summed-OD level separating cells (including pale cytoplasm) from the glass.

    Otsu between glass and stained pixels, clipped at the median of the stained pixels (those
    above a faint floor) so dark nuclei do not pull the split up and a field that is mostly
    glass still splits glass from cells rather than noise; the result is moved
    to ``frac`` of the way from the glass level to that split, because pale cytoplasm sits much
    closer to the glass than red cells do.
    """
    sample = total.ravel()[:: max(1, total.size // 100_000)]
    stained = sample[sample > 0.1]
    hi = np.percentile(stained, 50) if stained.size > 100 else np.percentile(sample, 90)
    clipped = np.minimum(sample, hi)
    t_o = otsu(clipped)
    below = clipped[clipped < t_o]
    glass = float(np.median(below)) if below.size else 0.0
    return max(glass + frac * (t_o - glass), 0.05)
