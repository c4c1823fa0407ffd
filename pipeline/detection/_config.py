"""Detector settings (typed, validated; every error names the field at fault)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from pipeline.errors import ConfigError

__all__ = ["DetectorConfig"]


@dataclass(frozen=True)
class DetectorConfig:
    """Settings of :func:`pipeline.detection.detect_wbc` (lengths µm, areas µm²).

    ``working_mpp`` is the resolution (µm/px) detection runs at: finer images are reduced to it
    (a white cell of ~12 µm is still ~24 px across at 0.5 µm/px, and a 1024² tile costs a few
    milliseconds), coarser ones are used as they are.

    ``max_detect_mpp`` (opt-in) picks the pyramid level the detection stage reads: the coarsest
    level whose mpp is at most this, else level 0. None (default): the level whose mpp is closest
    to ``working_mpp`` (log scale, finer wins a tie), which reads level 0 of a 0.25/1.0/4.0 µm/px
    40x pyramid. With the verifier retrained on scanner-stored views (JPEG 4:2:0, 0.5-1.1
    µm/px), a 1.1 µm/px level stored at JPEG q80 keeps precision >= 0.965 but recall 0.962-0.964
    on TXL-PBC val and BCCD, against 0.974-0.983 at today's level, so the coarser level is not
    the default (docs/readme/detection.md, "Detection level"). 1.1 admits the 1.0 µm/px
    level of a 40x scanner whose level 0 is a little coarser than 0.25 µm/px (0.2527 x 4 = 1.011).
    """

    working_mpp: float = 0.5
    #: coarsest pyramid level read for detection, µm/px, ≥ working_mpp (None: closest to it)
    max_detect_mpp: float | None = None
    #: plausible whole-cell diameters; outside them a cell is flagged, see ``implausible_size``
    min_cell_diameter_um: float = 6.0
    max_cell_diameter_um: float = 30.0
    #: variance of the Laplacian of a crop below which the stage flags ``out_of_focus``
    min_focus: float = 10.0
    #: nucleus candidate: optical-density feature above this (always), see ``_color``
    nucleus_threshold: float = 0.30
    #: nucleus area range of a white cell (platelets are ~3-8 µm², a small lymphocyte ~30 µm²)
    min_nucleus_area_um2: float = 9.0
    max_nucleus_area_um2: float = 1500.0
    #: lobes/fragments of one nucleus closer than this are one cell (segmented neutrophils)
    lobe_merge_um: float = 1.5
    #: fragments smaller than this (a lobe, not a whole nucleus) join neighbours up to
    #: 2.5 x lobe_merge_um away
    lobe_max_area_um2: float = 30.0
    #: a nucleus group larger than this (µm²) and filling less than ``chain_min_fill`` of its
    #: bounding box is red-cell rims chained to (maybe) a nucleus, and is re-thresholded within
    #: itself (see ``_detector._split_chains``)
    chain_area_um2: float = 120.0
    chain_min_fill: float = 0.4
    #: times a chained group is cut again (0: never re-threshold)
    chain_passes: int = 2
    #: detections whose score (probability of being a white cell) is below this are dropped
    min_score: float = 0.1
    #: use the bundled learned verifier to score candidates (False: colour/size score only)
    use_verifier: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("float", float):
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                    raise ConfigError(
                        f"DetectorConfig.{f.name}: must be a finite number, got {v!r}"
                    )
            elif f.type in ("bool", bool) and not isinstance(v, bool):
                raise ConfigError(f"DetectorConfig.{f.name}: must be true or false, got {v!r}")
        positive = (
            "working_mpp",
            "min_cell_diameter_um",
            "max_cell_diameter_um",
            "nucleus_threshold",
            "min_nucleus_area_um2",
            "max_nucleus_area_um2",
            "lobe_max_area_um2",
            "chain_area_um2",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"DetectorConfig.{name}: must be > 0, got {getattr(self, name)!r}"
                )
        if self.working_mpp > 5.0:
            raise ConfigError(
                f"DetectorConfig.working_mpp: {self.working_mpp} µm/px is too coarse to see a "
                "white cell (use ≤ 5)"
            )
        if self.max_detect_mpp is not None:
            v = self.max_detect_mpp
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(
                    f"DetectorConfig.max_detect_mpp (--max-detect-mpp): must be a number of µm/px or None, got {v!r}"
                )
            # Below working_mpp the stage would read finer pixels than the detector uses.
            if not self.working_mpp <= v <= 5.0:
                raise ConfigError(
                    f"DetectorConfig.max_detect_mpp (--max-detect-mpp): must be in [working_mpp = "
                    f"{self.working_mpp}, 5] µm/px, got {v!r}"
                )
        if self.max_cell_diameter_um <= self.min_cell_diameter_um:
            raise ConfigError(
                "DetectorConfig.max_cell_diameter_um: must exceed min_cell_diameter_um "
                f"({self.max_cell_diameter_um} ≤ {self.min_cell_diameter_um})"
            )
        if self.max_nucleus_area_um2 <= self.min_nucleus_area_um2:
            raise ConfigError(
                "DetectorConfig.max_nucleus_area_um2: must exceed min_nucleus_area_um2 "
                f"({self.max_nucleus_area_um2} ≤ {self.min_nucleus_area_um2})"
            )
        if self.min_focus < 0:
            raise ConfigError(f"DetectorConfig.min_focus: must be ≥ 0, got {self.min_focus!r}")
        if self.lobe_merge_um < 0:
            raise ConfigError(
                f"DetectorConfig.lobe_merge_um: must be ≥ 0, got {self.lobe_merge_um!r}"
            )
        if not 0.0 <= self.chain_min_fill <= 1.0:
            raise ConfigError(
                f"DetectorConfig.chain_min_fill: must be in [0, 1], got {self.chain_min_fill!r}"
            )
        v = self.chain_passes
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 10:
            raise ConfigError(
                f"DetectorConfig.chain_passes: must be an integer in [0, 10], got {v!r}"
            )
        if not 0.0 <= self.min_score <= 1.0:
            raise ConfigError(
                f"DetectorConfig.min_score: must be in [0, 1], got {self.min_score!r}"
            )
