"""White-blood-cell detection, scale estimation and cell segmentation (pure numpy, no I/O).

Public API (see docs/interfaces.md "Detection algorithms"):
``DetectorConfig``, ``detect_wbc``, ``Detection``, ``estimate_mpp``, ``segment_cell``,
``Morphometry``, ``nucleus_points`` (candidate points of every size-plausible nucleus);
``jpeg_roundtrip`` and ``reduce_to`` (the storage conditions of a scanned level).
"""

from __future__ import annotations

from pipeline.detection._config import DetectorConfig
from pipeline.detection._detector import Detection, detect_wbc, nucleus_points
from pipeline.detection._scale import RBC_DIAMETER_UM, estimate_mpp
from pipeline.detection._segment import Morphometry, segment_cell
from pipeline.detection._storage import jpeg_roundtrip, reduce_to

__all__ = [
    "DetectorConfig",
    "Detection",
    "detect_wbc",
    "nucleus_points",
    "estimate_mpp",
    "RBC_DIAMETER_UM",
    "Morphometry",
    "segment_cell",
    "jpeg_roundtrip",
    "reduce_to",
]
