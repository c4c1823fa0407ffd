"""Stain-agnostic colour features shared by detection, scale estimation and segmentation.

Romanowsky-type stains (Wright, Giemsa, May-Grünwald-Giemsa, Leishman) colour nuclei purple/blue
and red cells pink/grey. In optical density (OD = log(background / I)), a nucleus absorbs green
strongly and blue comparatively little, a red cell absorbs green weakly; ``OD_G - 0.5 OD_B`` (the
"nucleus feature") separates them across the four TXL-PBC sources better than hue or a fixed
haematoxylin vector, because it is relative to each image's own background.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__: list[str] = []


def check_rgb(rgb: object, name: str = "rgb") -> np.ndarray:
    from pipeline.errors import ConfigError

    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
        shape = getattr(rgb, "shape", None)
        raise ConfigError(f"{name}: expected an (H, W, 3) uint8 array, got shape {shape}")
    if rgb.dtype != np.uint8:
        raise ConfigError(f"{name}: expected dtype uint8, got {rgb.dtype}")
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        raise ConfigError(f"{name}: image too small {rgb.shape[:2]}")
    return rgb


def background_rgb(rgb: np.ndarray) -> np.ndarray:
    """Per-channel brightness of the glass (float32 (3,)): median colour of the brightest 5 %.

    Floored at 150 so that a tile filled with cells does not call a cell the background.
    """
    flat = rgb.reshape(-1, 3)
    if flat.shape[0] > 200_000:  # a strided sample is plenty for a percentile
        flat = flat[:: flat.shape[0] // 200_000 + 1]
    lum = flat.astype(np.int32).sum(1)
    cut = np.percentile(lum, 95)
    bright = flat[lum >= cut]
    bg = np.median(bright, axis=0).astype(np.float32)
    return np.maximum(bg, 150.0)


def optical_density(rgb: np.ndarray, bg: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) float32 OD relative to ``bg``, clipped at 0."""
    if bg is None:
        bg = background_rgb(rgb)
    lut = np.empty((3, 256), np.float32)
    for c in range(3):
        lut[c] = np.log((bg[c] + 1.0) / (np.arange(256, dtype=np.float32) + 1.0))
    od = np.stack([lut[c][rgb[..., c]] for c in range(3)], axis=-1)
    return np.maximum(od, 0.0)


def nucleus_feature(od: np.ndarray) -> np.ndarray:
    """(H, W) float32: high on nuclei (purple/blue), low on red cells, glass and cytoplasm."""
    return od[..., 1] - 0.5 * od[..., 2]


def smooth(img: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px < 0.3:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigma_px)


def disk(radius_px: float) -> np.ndarray:
    r = max(int(round(radius_px)), 0)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu threshold of a 1-D float sample (float; the midpoint for a constant sample)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return 0.0
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-6:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


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
