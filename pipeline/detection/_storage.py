"""How a whole-slide scanner stores a pyramid level: area-reduced, then JPEG with 4:2:0 chroma.

Shared by the detection evaluation (``pipeline.eval_detect --detect-mpp/--detect-jpeg``) and
the verifier's training (``train.py`` generates candidates under these storage conditions),
so both see exactly the same degradation.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__: list[str] = []


def reduce_to(rgb: np.ndarray, mpp: float, target_mpp: float) -> tuple[np.ndarray, float, float]:
    """``rgb`` ((H, W, 3) uint8 at ``mpp`` µm/px) area-reduced to ``target_mpp`` µm/px.

    ``cv2.INTER_AREA`` to ``round(W * mpp / target_mpp)`` px wide (likewise high, at least
    2 px), as a scanner builds a coarser level from level 0. Returns (image, sx, sy): new px per
    px of ``rgb`` along x and y. A target not coarser than ``mpp`` returns ``rgb`` itself, 1, 1.
    """
    if target_mpp <= mpp:
        return rgb, 1.0, 1.0
    h, w = rgb.shape[:2]
    f = mpp / target_mpp
    nw, nh = max(int(round(w * f)), 2), max(int(round(h * f)), 2)
    small = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
    return small, nw / w, nh / h


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """``rgb`` ((H, W, 3) uint8) encoded as JPEG of ``quality`` (1-100) and decoded again.

    OpenCV's default chroma subsampling is 4:2:0, as in scanners' YCbCr JPEG tiles (Aperio SVS):
    colour is stored at half the resolution in each direction.
    """
    ok, buf = cv2.imencode(
        ".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    )
    if not ok:
        raise ValueError("JPEG encoding failed")
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1])
