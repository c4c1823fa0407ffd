"""Physical scale from the red cells (typical diameter 7.5 µm): :mod:`hemblip.scale`'s estimator.

The estimator is defined once, in :mod:`hemblip.scale`, so the dataset readers that cut training
crops and the job that cuts serving crops give a field the same µm/px. This module checks its
input the pipeline's way (:class:`~pipeline.errors.ConfigError`) and delegates.
"""

from __future__ import annotations

import numpy as np

from hemblip import scale as _hs
from pipeline.detection._color import check_rgb

__all__ = ["estimate_mpp", "RBC_DIAMETER_UM", "red_cell_diameter_px"]

RBC_DIAMETER_UM = _hs.RBC_DIAMETER_UM


def red_cell_diameter_px(rgb: np.ndarray, min_cells: float = 0.5) -> float | None:
    """Typical red-cell diameter in px of ``rgb`` ((H, W, 3) uint8), or None
    (:func:`hemblip.scale.red_cell_diameter_px`)."""
    check_rgb(rgb)
    return _hs.red_cell_diameter_px(rgb, min_cells=min_cells)


def estimate_mpp(rgb: np.ndarray, min_cells: float = 0.5) -> float | None:
    """µm per pixel of ``rgb`` ((H, W, 3) uint8) from its red cells, or None
    (:func:`hemblip.scale.estimate_mpp`). Red cells should be ≥ ~10 px across in ``rgb``."""
    check_rgb(rgb)
    return _hs.estimate_mpp(rgb, min_cells=min_cells)
