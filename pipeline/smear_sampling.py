"""Per-slide cell budget: a spatially balanced, equal-probability sample of a slide's cells.

A manual 100/200-cell differential (or LeukoLocator's 3,000-cell cap) reads fields spread over
the reading zone, not the first cells met. :func:`spatial_sample` does the same on detected cell
centroids, in the way of GRTS (generalized random tessellation stratified) sampling:

1. Every point gets a hierarchical quadtree address over a randomly shifted square covering the
   points; at every level the four quadrant digits of each parent cell are permuted at random
   (a per-cell permutation from a hash of seed, level and parent), so the order is a randomised
   space-filling curve: points next to each other in the order are next to each other in space.
2. A systematic sample along that order (step ``N / n``, random start) keeps ``n`` points.

Every point has the same inclusion probability ``n / N`` (so the sample's mix of cell types is
unbiased), and any compact part of the area holding a fraction ``f`` of the points gets about
``f * n`` of the sample (spatial balance: closer than a simple random sample). Deterministic for
a given ``seed``; no dependence on the points' input order beyond exact ties.
"""

from __future__ import annotations

import math
from itertools import permutations

import numpy as np

from pipeline.errors import ConfigError

__all__ = ["balanced_order", "spatial_sample"]

_PERMS = np.array(list(permutations(range(4))), dtype=np.int64)  # 24 x 4
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(v: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        v = (v ^ (v >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        v = (v ^ (v >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (v ^ (v >> np.uint64(31))) & _MASK64


def _curve_order(pts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``pts`` (``(N, 2)``, N >= 1) along a randomised space-filling curve (steps 1
    of the module docstring; ``rng`` draws the shift, the permutations and the tie order)."""
    total = len(pts)
    lo = pts.min(axis=0)
    side = float(max((pts.max(axis=0) - lo).max(), 1e-9))
    # A square twice the points' extent, shifted at random, so no point sits on a fixed grid line.
    origin = lo - rng.uniform(0.0, side, size=2)
    side *= 2.0
    # Levels until cells hold about one point each (and not beyond float precision).
    depth = int(min(26, max(1, math.ceil(math.log(max(total, 2), 4)) + 2)))
    grid = 1 << depth
    ij = np.clip(((pts - origin) / side * grid).astype(np.int64), 0, grid - 1)
    salt = np.uint64(rng.integers(0, 2**63))
    key = np.zeros(total, np.int64)
    parent = np.zeros(total, np.int64)  # address of the parent cell at the current level
    for lev in range(depth):
        shift = depth - 1 - lev
        digit = ((ij[:, 0] >> shift) & 1) | (((ij[:, 1] >> shift) & 1) << 1)
        h = _mix(
            parent.astype(np.uint64)
            ^ salt
            ^ np.uint64((lev + 1) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF)
        )
        perm = _PERMS[(h % np.uint64(24)).astype(np.int64)]
        randomized = perm[np.arange(total), digit]
        key = key * 4 + randomized
        parent = parent * 4 + digit + 1
    # Exact ties (points in one finest cell) in random order.
    order = np.lexsort((rng.permutation(total), key))
    return order


def _checked(points, seed) -> np.ndarray:
    """``points`` as a float ``(N, 2)`` array, after checking them and ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**63:
        raise ConfigError(f"sampling seed must be an integer in [0, 2**63), got {seed!r}")
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or (pts.size and pts.shape[1] != 2) or not np.isfinite(pts).all():
        raise ConfigError(f"points must be a finite (N, 2) array, got shape {pts.shape}")
    with np.errstate(over="ignore"):
        span = np.ptp(pts, axis=0) if pts.size else np.zeros(2)
    if not np.isfinite(span).all():
        raise ConfigError("points must span a finite extent (coordinates too large)")
    return pts


def spatial_sample(points, n: int, seed: int = 0) -> np.ndarray:
    """Indices (sorted, int64) of ``n`` of ``points`` (``(N, 2)`` x, y in any unit), spatially
    balanced with equal inclusion probability ``n / N`` (see the module docstring).

    ``n >= N`` returns every index. Raises :class:`~pipeline.errors.ConfigError` for a negative
    or non-integer ``n``, a bad seed, or points that are not a finite ``(N, 2)`` array.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ConfigError(f"max cells per slide must be an integer >= 0, got {n!r}")
    pts = _checked(points, seed)
    total = len(pts)
    if n >= total:
        return np.arange(total, dtype=np.int64)
    if n == 0:
        return np.empty(0, np.int64)
    rng = np.random.default_rng(int(seed))
    order = _curve_order(pts, rng)
    step = total / n
    start = rng.uniform(0.0, step)
    picks = np.minimum(np.floor(start + step * np.arange(n)).astype(np.int64), total - 1)
    return np.sort(order[picks])


def balanced_order(points, seed: int = 0) -> np.ndarray:
    """Every index of ``points`` (``(N, 2)``), in an order each of whose prefixes is a spatially
    balanced sample: the randomised curve of :func:`spatial_sample`, shifted cyclically by a
    random offset and visited in bit-reversed order (positions 0, N/2, N/4, 3N/4, ... of the
    curve), so the first ``k`` points are spread over the whole area at any ``k``. For a given
    ``k`` every point is among the first ``k`` with probability ``k / N`` (the random offset
    makes each point's curve position uniform). For reading fields until a budget is reached,
    as a manual differential moves over the reading zone. Raises
    :class:`~pipeline.errors.ConfigError` like :func:`spatial_sample`."""
    pts = _checked(points, seed)
    total = len(pts)
    if total <= 1:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(int(seed))
    curve = _curve_order(pts, rng)
    bits = (total - 1).bit_length()
    idx = np.arange(1 << bits, dtype=np.int64)
    rev = np.zeros_like(idx)
    for b in range(bits):
        rev |= ((idx >> b) & 1) << (bits - 1 - b)
    rev = rev[rev < total]
    return curve[(rev + int(rng.integers(0, total))) % total]
