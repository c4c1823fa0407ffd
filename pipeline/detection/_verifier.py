"""Learned verifier of nucleus candidates: a logistic model on colour/shape/size features.

Weights live in ``verifier.npz`` beside this module (trained by ``train.py`` on the TXL-PBC
train split); a missing file is an error (``use_verifier=False`` scores by colour contrast).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

__all__: list[str] = []

WEIGHTS = Path(__file__).with_name("verifier.npz")

FEATURE_NAMES = (
    "log_area",
    "feat_mean_rel",
    "feat_p90_rel",
    "contrast_rel",
    "od_r",
    "od_g",
    "od_b",
    "od_b_over_g",
    "extent_um",
    "fill",
    "n_frag",
    "border",
)


def feature_vector(fe: dict) -> np.ndarray:
    thr = max(fe["thr"], 1e-6)
    return np.array(
        [
            np.log(fe["area_um2"]),
            fe["feat_mean"] / thr,
            fe["feat_p90"] / thr,
            (fe["feat_mean"] - fe["feat_ring"]) / thr,
            fe["od_r"],
            fe["od_g"],
            fe["od_b"],
            fe["od_b"] / max(fe["od_g"], 1e-3),
            np.log(max(fe["extent_um"], 0.1)),
            fe["fill"],
            min(fe["n_frag"], 6),
            fe["border"],
        ],
        dtype=np.float64,
    )


@lru_cache(maxsize=1)
def _load() -> dict | None:
    if not WEIGHTS.is_file():
        return None
    with np.load(WEIGHTS) as z:
        return {k: z[k] for k in z.files}


def score_candidates(feats: list[dict]) -> list[float]:
    """Probability that each candidate (feature dict from the detector) is a white cell."""
    if not feats:
        return []
    w = _load()
    if w is None:
        from pipeline.errors import ConfigError

        raise ConfigError(
            f"DetectorConfig.use_verifier: the verifier weights {WEIGHTS} are missing "
            "(reinstall the package, or set use_verifier=False for the colour score)"
        )
    x = np.stack([feature_vector(fe) for fe in feats])
    z = (x - w["mean"]) / w["std"]
    h = np.maximum(z @ w["w1"] + w["b1"], 0.0)
    logit = h @ w["w2"] + w["b2"]
    return [float(v) for v in 1.0 / (1.0 + np.exp(-logit.ravel()))]
