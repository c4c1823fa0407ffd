"""Calibrated per-cell confidence for the cell type a caption names.

The captioner scores every ontology cell type by teacher-forcing the caption's opening words up to
and including the type (``"This is a neutrophil"``, ``"Neutrophil"`` for the leukemic style) over
the crop's image features; the type's score is the log of the summed probability of its openings.
``p(type | image) = softmax(score / T)`` over the types, and the per-cell confidence is that
probability for the type the generated caption names.

``T`` (temperature scaling, one parameter) is fitted on validation cells so that the confidence
means what it says: among cells with confidence ~0.8, ~80 % of the named types are right. It is
stored next to the weights as ``calibration.json`` with the model version it was fitted for; a
missing, unreadable, hostile or stale file leaves the model *uncalibrated* (``T = 1``, flagged),
never unloadable.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "CALIBRATION_FILE",
    "FORMAT",
    "T_MIN",
    "T_MAX",
    "Calibration",
    "UNCALIBRATED",
    "load_calibration",
    "write_calibration",
    "type_probabilities",
    "confidence_nll",
    "fit_temperature",
    "expected_calibration_error",
    "reliability_table",
    "reliability_svg",
    "reliability_markdown",
    "calibrate_captioner",
]

_log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
FORMAT = "hemblip-calibration/1"
#: Accepted temperatures: outside this a fit (or a file) says the scores carry no usable signal,
#: or someone typed a number by hand; both are refused rather than silently clipped.
T_MIN, T_MAX = 0.05, 20.0
_MAX_BYTES = 64 * 1024  # a calibration file is a few hundred bytes; never read a planted giant


@dataclass(frozen=True)
class Calibration:
    """The temperature a captioner divides cell-type scores by, and whether it was fitted.

    ``calibrated`` False means ``temperature`` is 1 (raw model probabilities) and ``reason`` says
    why (no file, refused file, ...). ``info``: the file's other fields (data, ECE, date).
    """

    temperature: float = 1.0
    calibrated: bool = False
    reason: str | None = "no calibration"
    source: str | None = None
    info: Mapping[str, object] = field(default_factory=dict)


UNCALIBRATED = Calibration()


def _refuse(path: Path, why: str) -> Calibration:
    _log.warning("%s: ignored, cell-type confidence is uncalibrated (T=1): %s", path, why)
    return Calibration(reason=f"{path.name} refused: {why}", source=str(path))


def load_calibration(directory: str | os.PathLike | None, model_version: str | None) -> Calibration:
    """Read ``directory/calibration.json`` for a model of ``model_version``; never raises.

    Missing file: uncalibrated, no warning (most checkpoints have none). A file that is not a
    regular file inside ``directory``, over 64 KiB, not JSON, not an object of the expected
    format, with a temperature that is not a finite number in [``T_MIN``, ``T_MAX``], or fitted
    for another model version is ignored with a one-line warning naming the file and the cause.
    """
    if directory is None:
        return Calibration(reason="no checkpoint directory")
    d = Path(directory)
    path = d / CALIBRATION_FILE
    try:
        if not os.path.lexists(path):
            return Calibration(reason=f"no {CALIBRATION_FILE}", source=str(path))
        real = path.resolve()
        if not real.is_relative_to(d.resolve()):
            return _refuse(path, "resolves outside the checkpoint directory")
        if not real.is_file():
            return _refuse(path, "not a regular file")
        size = real.stat().st_size
        if size > _MAX_BYTES:
            return _refuse(
                path, f"{size} bytes, more than the {_MAX_BYTES} a calibration file holds"
            )
        raw = real.read_bytes()
    except OSError as exc:
        return _refuse(path, f"unreadable ({exc.strerror or type(exc).__name__})")
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return _refuse(
            path, f"not JSON ({(str(exc).splitlines() or [type(exc).__name__])[0][:120]})"
        )
    if not isinstance(doc, dict):
        return _refuse(path, f"expected a JSON object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        return _refuse(path, f"format must be {FORMAT!r}, got {_short(doc.get('format'))}")
    t = doc.get("temperature")
    if isinstance(t, bool) or not isinstance(t, int | float):
        return _refuse(path, f"temperature must be a number, got {_short(t)}")
    try:
        t = float(t)
    except OverflowError:
        t = math.inf
    if not math.isfinite(t) or not T_MIN <= t <= T_MAX:
        return _refuse(
            path, f"temperature {_short(doc.get('temperature'))} outside [{T_MIN}, {T_MAX}]"
        )
    fitted_for = doc.get("model_version")
    if not isinstance(fitted_for, str):
        return _refuse(path, f"model_version must be a string, got {_short(fitted_for)}")
    if model_version is not None and fitted_for != model_version:
        return _refuse(
            path,
            f"fitted for model version {_short(fitted_for)}, this model is "
            f"{model_version} (re-run `python -m hemblip calibrate`)",
        )
    info = {k: v for k, v in doc.items() if k not in ("temperature", "format")}
    return Calibration(temperature=t, calibrated=True, reason=None, source=str(path), info=info)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def write_calibration(
    directory: str | os.PathLike, temperature: float, model_version: str, **info: object
) -> Path:
    """Write ``directory/calibration.json`` atomically (temporary file, then rename).

    ``temperature`` must be finite and in [``T_MIN``, ``T_MAX``] (``ValueError`` otherwise);
    ``info``: JSON-able fields recorded with it (data, split, ECE, date).
    """
    t = float(temperature)
    if not math.isfinite(t) or not T_MIN <= t <= T_MAX:
        raise ValueError(f"temperature {t!r} outside [{T_MIN}, {T_MAX}]")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": FORMAT,
        "temperature": round(t, 6),
        "model_version": str(model_version),
        **info,
    }
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    out = d / CALIBRATION_FILE
    tmp = d / f".{CALIBRATION_FILE}.{os.getpid()}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- maths
def type_probabilities(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of ``scores / temperature`` over the last axis (cell types).

    ``scores``: (..., K) log-probabilities (nats; ``-inf`` = the type cannot be said). Rows that
    are all ``-inf`` give all-NaN probabilities.
    """
    s = np.asarray(scores, dtype=np.float64) / float(temperature)
    with np.errstate(invalid="ignore"):
        m = np.max(s, axis=-1, keepdims=True)
        e = np.exp(s - m)
        return e / e.sum(axis=-1, keepdims=True)


def _confidences(scores: np.ndarray, predicted: np.ndarray, temperature: float) -> np.ndarray:
    p = type_probabilities(scores, temperature)
    return p[np.arange(len(predicted)), predicted]


def confidence_nll(
    scores: np.ndarray, predicted: Sequence[int], truth: Sequence[int], temperature: float = 1.0
) -> float:
    """Mean log-loss (nats) of the confidence in the predicted types being right.

    ``scores``: (N, K); ``predicted``/``truth``: (N,) type indices. The confidence of cell i is
    ``softmax(scores[i] / T)[predicted[i]]``; the loss is the binary cross-entropy of that
    against ``predicted[i] == truth[i]`` (a proper scoring rule: lowest for calibrated values).
    """
    predicted, truth = np.asarray(predicted, dtype=int), np.asarray(truth, dtype=int)
    c = np.clip(_confidences(scores, predicted, temperature), 1e-12, 1 - 1e-12)
    y = predicted == truth
    return float(-np.mean(np.where(y, np.log(c), np.log1p(-c))))


def fit_temperature(scores: np.ndarray, predicted: Sequence[int], truth: Sequence[int]) -> float:
    """The temperature in [``T_MIN``, ``T_MAX``] minimising :func:`confidence_nll`.

    A grid over log T, then golden-section refinement around the best point (the loss is one
    smooth function of one parameter; no optimiser dependency). ``ValueError`` on no cells or
    on scores that are not finite where a type was predicted.
    """
    scores = np.asarray(scores, dtype=np.float64)
    predicted, truth = np.asarray(predicted, dtype=int), np.asarray(truth, dtype=int)
    if (
        scores.ndim != 2
        or len(scores) == 0
        or len(predicted) != len(scores)
        or len(truth) != len(scores)
    ):
        raise ValueError(
            f"need (N, K) scores and N predicted/true types with N > 0, got "
            f"{scores.shape}, {predicted.shape}, {truth.shape}"
        )
    if not np.all(np.isfinite(scores[np.arange(len(scores)), predicted])):
        raise ValueError("a predicted type has a non-finite score")

    def loss(log_t: float) -> float:
        return confidence_nll(scores, predicted, truth, math.exp(log_t))

    lo, hi = math.log(T_MIN), math.log(T_MAX)
    grid = np.linspace(lo, hi, 121)
    values = [loss(g) for g in grid]
    i = int(np.argmin(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(40):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    best = (a + b) / 2
    if values[i] < loss(best):
        best = float(grid[i])
    return float(min(max(math.exp(best), T_MIN), T_MAX))


def reliability_table(
    confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10
) -> list[dict]:
    """Equal-width confidence bins over [0, 1] (1.0 falls in the last bin).

    One dict per bin: ``lo``, ``hi``, ``count``, ``mean_confidence`` and ``accuracy`` (None
    for an empty bin).
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    idx = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    rows = []
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        rows.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "count": n,
                "mean_confidence": float(conf[sel].mean()) if n else None,
                "accuracy": float(ok[sel].mean()) if n else None,
            }
        )
    return rows


def expected_calibration_error(
    confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10
) -> float:
    """ECE: the count-weighted mean |accuracy - mean confidence| over :func:`reliability_table` bins."""
    rows = reliability_table(confidence, correct, n_bins)
    total = sum(r["count"] for r in rows)
    if total == 0:
        return float("nan")
    return float(
        sum(r["count"] * abs(r["accuracy"] - r["mean_confidence"]) for r in rows if r["count"])
        / total
    )


def _xml(text: str) -> str:
    return (
        str(text)
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
    )


def reliability_svg(
    before: Sequence[Mapping],
    after: Sequence[Mapping],
    *,
    title: str,
    ece_before: float,
    ece_after: float,
    temperature: float,
) -> str:
    """A reliability diagram as standalone SVG: accuracy per confidence bin, before (T = 1) and
    after calibration, against the diagonal; bar width ∝ nothing, counts printed under the bins.

    ``before``/``after``: :func:`reliability_table` rows. Text is XML-escaped (titles may carry
    a data path).
    """
    w, h, left, top, size = 520, 470, 60, 50, 360
    n = len(after)
    bw = size / n

    def x(v: float) -> float:
        return left + v * size

    def y(v: float) -> float:
        return top + (1 - v) * size

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="13">{_xml(title)}</text>',
        f'<text x="{w / 2}" y="36" text-anchor="middle">ECE {ece_before:.3f} (T = 1) → '
        f"{ece_after:.3f} (T = {temperature:.2f}); 10 bins</text>",
        f'<rect x="{left}" y="{top}" width="{size}" height="{size}" fill="none" stroke="#333"/>',
    ]
    for k in range(0, 11, 2):
        v = k / 10
        out.append(f'<line x1="{x(v)}" y1="{y(0)}" x2="{x(v)}" y2="{y(0) + 4}" stroke="#333"/>')
        out.append(f'<text x="{x(v)}" y="{y(0) + 16}" text-anchor="middle">{v:.1f}</text>')
        out.append(f'<line x1="{x(0) - 4}" y1="{y(v)}" x2="{x(0)}" y2="{y(v)}" stroke="#333"/>')
        out.append(f'<text x="{x(0) - 7}" y="{y(v) + 4}" text-anchor="end">{v:.1f}</text>')
    for rows, colour, shift in ((before, "#c8c8c8", 0.0), (after, "#3a76b8", 0.5)):
        for b, r in enumerate(rows):
            if not r["count"]:
                continue
            acc = float(r["accuracy"])
            out.append(
                f'<rect x="{x(b / n) + shift * bw + 1:.1f}" y="{y(acc):.1f}" '
                f'width="{bw / 2 - 2:.1f}" height="{y(0) - y(acc):.1f}" fill="{colour}"/>'
            )
    for b, r in enumerate(after):
        out.append(
            f'<text x="{x((b + 0.5) / n):.1f}" y="{y(0) + 30}" text-anchor="middle" '
            f'fill="#3a76b8">{r["count"]}</text>'
        )
    out.append(
        f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(1)}" stroke="#b33" stroke-dasharray="4 3"/>'
    )
    out.append(
        f'<text x="{w / 2}" y="{y(0) + 46}" text-anchor="middle">confidence of the captioned '
        "cell type (cells per bin, calibrated, in blue)</text>"
    )
    out.append(
        f'<text x="16" y="{top + size / 2}" text-anchor="middle" '
        f'transform="rotate(-90 16 {top + size / 2})">accuracy of the captioned type</text>'
    )
    lx = left + 10
    out.append(
        f'<rect x="{lx}" y="{top + 8}" width="12" height="10" fill="#c8c8c8"/>'
        f'<text x="{lx + 16}" y="{top + 17}">uncalibrated (T = 1)</text>'
    )
    out.append(
        f'<rect x="{lx}" y="{top + 24}" width="12" height="10" fill="#3a76b8"/>'
        f'<text x="{lx + 16}" y="{top + 33}">calibrated</text>'
    )
    out.append(
        f'<line x1="{lx}" y1="{top + 45}" x2="{lx + 12}" y2="{top + 45}" stroke="#b33" '
        f'stroke-dasharray="4 3"/><text x="{lx + 16}" y="{top + 49}">perfect calibration</text>'
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- fitting a captioner
def _collect(captioner, samples: Sequence) -> dict:
    """Caption ``samples`` and pair each cell's raw type scores with its captioned and true type."""
    from hemblip.ontology import CELL_TYPES

    index = {ct: k for k, ct in enumerate(CELL_TYPES)}
    labelled = [s for s in samples if getattr(s, "cell_type", None) in index]
    if not labelled:
        return {
            "n_cells": 0,
            "n_typed": 0,
            "scores": np.zeros((0, len(CELL_TYPES))),
            "predicted": np.zeros(0, int),
            "truth": np.zeros(0, int),
        }
    results, scores = captioner.caption_and_score([s.image for s in labelled])
    if scores is None:
        raise ValueError("the captioner was built with type_confidence=False")
    keep = [
        i
        for i, r in enumerate(results)
        if r.cell_type in index and np.isfinite(scores[i, index[r.cell_type]])
    ]
    return {
        "n_cells": len(labelled),
        "n_typed": len(keep),
        "scores": scores[keep],
        "predicted": np.array([index[results[i].cell_type] for i in keep], dtype=int),
        "truth": np.array([index[labelled[i].cell_type] for i in keep], dtype=int),
    }


def _figures(c: dict, temperature: float) -> dict:
    if not c["n_typed"]:
        return {"ece": None, "nll": None, "reliability": reliability_table([], [])}
    conf = _confidences(c["scores"], c["predicted"], temperature)
    ok = c["predicted"] == c["truth"]
    return {
        "ece": expected_calibration_error(conf, ok),
        "nll": confidence_nll(c["scores"], c["predicted"], c["truth"], temperature),
        "reliability": reliability_table(conf, ok),
    }


def calibrate_captioner(captioner, samples: Sequence, held_out: Sequence | None = None) -> dict:
    """Fit the temperature of ``captioner``'s cell-type confidence on ``samples`` (validation
    cells with a known ``cell_type``) and measure it.

    Cells whose caption names no type carry no confidence and are left out (counted in
    ``n_cells`` but not in ``n_typed``). Returns ``temperature`` and, for ``fit`` (and
    ``held_out`` when given: cells never used to fit): ``n_cells``, ``n_typed``, ``accuracy``
    (captioned type right, over typed cells), ``before``/``after`` each with ``ece``, ``nll``
    (nats, :func:`confidence_nll`) and the 10-bin ``reliability`` table. ``ValueError`` when
    no cell has both a known and a captioned type.
    """
    fit = _collect(captioner, samples)
    if not fit["n_typed"]:
        raise ValueError(
            f"none of {len(samples)} cells has both a known cell type and a caption "
            "naming one: nothing to calibrate on"
        )
    t = fit_temperature(fit["scores"], fit["predicted"], fit["truth"])
    out = {"temperature": t}
    for name, c in (
        ("fit", fit),
        ("held_out", _collect(captioner, held_out) if held_out else None),
    ):
        if c is None:
            continue
        out[name] = {
            "n_cells": c["n_cells"],
            "n_typed": c["n_typed"],
            "accuracy": float(np.mean(c["predicted"] == c["truth"])) if c["n_typed"] else None,
            "before": _figures(c, 1.0),
            "after": _figures(c, t),
        }
    return out


def reliability_markdown(rows: Sequence[Mapping]) -> str:
    """The 10-bin reliability table as Markdown (mean confidence, accuracy, cells per bin)."""

    def f(v):
        return "–" if v is None else f"{v:.3f}"

    lines = ["| confidence bin | mean confidence | accuracy | cells |", "|---|---|---|---|"]
    lines += [
        f"| {r['lo']:.1f}–{r['hi']:.1f} | {f(r['mean_confidence'])} | {f(r['accuracy'])} | {r['count']} |"
        for r in rows
    ]
    return "\n".join(lines)
