"""Static, self-contained HTML report of the outputs (one file: inline CSS/JS/SVG, data-URI images).

Sections: run summary (runs, slides failing now: each slide's latest outcome), caption ⇄ morphometry consistency, optional
cohort tables, per slide (differential count with 95% Wilson intervals, attribute distributions,
where cells were found drawn over the slide extent, QC flags), and a cell gallery grouped by cell
type with filters (slide, type, QC flag, consistency) kept in the URL hash, e.g.
``report.html#type=lymphocyte&flag=out_of_focus``. Cell data travel as one JSON blob and the
gallery renders pages of ``page_size`` cells, so thousands of cells stay responsive.

Only stored data are read: the ``thumbnail_jpeg`` column (re-encoded to ``thumb_px`` to keep the
file small), never the slides. No network access at view time.

Every stored string is treated as hostile (S3 keys, captions and QC flags come from outside):
it is escaped for the context it lands in (HTML text or quoted attribute via :func:`_e`; the cell
data as a JSON block with ``<``, ``>``, ``&``, U+2028/2029 escaped; URL hashes percent-encoded),
the page has no inline event handlers or style attributes, and a Content Security Policy allows
only the page's own ``<style>`` and ``<script>`` (by SHA-256 hash) and ``data:`` images. The file
is written to a temporary name beside ``--out`` and renamed, so a failed write leaves no part.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import json
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from PIL import Image

from hemblip.ontology import ABNORMAL_CELL_TYPES, ATTRIBUTE_NAMES, ATTRIBUTES, CELL_TYPES
from pipeline._report_assets import SCRIPT, STYLE
from pipeline.cohort import (
    ALPHA,
    MIN_UNITS_PER_COHORT,
    POOLED_SCOPE,
    CohortResult,
    cohort_analysis,
    summarize,
    wilson_interval,
)
from pipeline.consistency import consistency_summary
from pipeline.errors import ConfigError, PipelineError
from pipeline.outputs import Outputs, open_outputs
from pipeline.query import connect
from pipeline.schema import QC_FLAGS

__all__ = ["ReportStats", "ReportOutputError", "build_report", "TYPE_COLOURS"]

TYPE_COLOURS: dict[str | None, str] = dict(zip(CELL_TYPES, [
    "#1c7ed6", "#e8590c", "#7048e8", "#2f9e44", "#f08c00", "#c92a2a", "#a61e4d", "#862e9c",
    "#5c940d", "#0b7285", "#d6336c", "#e03131", "#364fc7"])) | {None: "#868e96"}
_VALUE_COLOURS = ["#4c6ef5", "#f76707", "#37b24d", "#ae3ec9", "#f59f00", "#15aabf", "#e64980"]
_MORPH = ["cell_diameter_um", "cell_area_um2", "nucleus_area_um2", "nc_ratio", "nucleus_circularity",
          "nucleus_lobes", "focus_score"]
_GALLERY_COLS = (["cell_id", "slide_id", "slide_name", "cell_index", "centroid_x", "centroid_y", "cell_type",
                  "case", "caption", "caption_logprob", "qc_flags", "consistent", "inconsistent_attributes"]
                 + _MORPH + list(ATTRIBUTE_NAMES))


@dataclass(frozen=True)
class ReportStats:
    path: Path
    slides: int
    cells: int
    bytes: int
    seconds: float


class ReportOutputError(PipelineError, OSError):
    """``--out`` cannot be written (a parent is a file, no permission, disk full, ...).

    ``str(err)`` is ``"--out <path>: <cause>"``, one line.
    """


class _Html(str):
    """Markup built by this module from escaped parts; :func:`_table` escapes any other cell."""


def _e(x: object) -> _Html:
    """``x`` as HTML text, safe in element content and in quoted (either quote) attribute values."""
    return _Html(html.escape("" if x is None else str(x), quote=True))


def _token(x: object) -> str:
    """A stored value reduced to a CSS class-name fragment (letters, digits, ``-``, ``_``)."""
    return re.sub(r"[^a-z0-9_-]", "-", str(x).lower())[:40]


def _show(x: object) -> str:
    """A path or id for a one-line message: control characters (newlines) shown escaped."""
    s = str(x)
    return s if s.isprintable() else ascii(s)


_OTHER_COLOUR = "#495057"


def _colour(t: str | None) -> str:
    return TYPE_COLOURS.get(t, _OTHER_COLOUR)


# colours come from fixed lists, never from data, and reach the page as classes: a CSP that
# forbids style attributes still lets the page's own (hashed) stylesheet colour the legends
_SWATCH_CSS = "".join(
    [f".sw-t{i}{{background:{c}}}" for i, c in enumerate(TYPE_COLOURS.values())]
    + [f".legend i.sw-v{j}{{background:{c};border-radius:2px}}" for j, c in enumerate(_VALUE_COLOURS)]
    + [f".sw-other{{background:{_OTHER_COLOUR}}}", ".sw-qc{background:#fff;border:2px solid #000}"])


def _swatch(t: str | None) -> str:
    keys = list(TYPE_COLOURS)
    return f"sw-t{keys.index(t)}" if t in TYPE_COLOURS else "sw-other"


def _name(uri: str | None) -> str:
    return (uri or "?").rstrip("/").rsplit("/", 1)[-1]


def _cell(c: object) -> str:
    return c if isinstance(c, _Html) else _e(c)


def _table(headers: list[str], rows: list[list[object]], num: set[int] | None = None) -> str:
    """An HTML table; cells are escaped unless they are :class:`_Html` built by this module."""
    num = num or set()
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td class='num'>{_cell(c)}</td>" if i in num else f"<td>{_cell(c)}</td>"
                         for i, c in enumerate(r)) + "</tr>"
        for r in rows)
    return f"<table class='data'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _pct(x: float | None, d: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{d}f}%"


def _differential_svg(counts: dict[str | None, int]) -> str:
    """Horizontal bars of each cell type's share of typed cells, with 95% Wilson whiskers."""
    n = sum(v for t, v in counts.items() if t is not None)
    types = [t for t in CELL_TYPES if counts.get(t)] + sorted(t for t in counts if t and t not in CELL_TYPES)
    if not n:
        return "<p class='muted'>No typed cells.</p>"
    lw, bw, rh = 150, 300, 22
    h = rh * len(types) + 24
    parts = [f"<svg class='diff-chart' role='img' aria-label='differential count' width='{lw + bw + 175}' height='{h}' "
             f"viewBox='0 0 {lw + bw + 175} {h}' xmlns='http://www.w3.org/2000/svg'>"]
    for frac in (0, 0.25, 0.5, 0.75, 1.0):
        x = lw + frac * bw
        parts.append(f"<line x1='{x:.1f}' y1='0' x2='{x:.1f}' y2='{h - 16}' stroke='#e3e6ec'/>"
                     f"<text x='{x:.1f}' y='{h - 3}' font-size='10' text-anchor='middle' fill='#5b6475'>{int(frac * 100)}%</text>")
    for i, t in enumerate(types):
        k = counts[t]
        lo, hi = wilson_interval(k, n)
        y = i * rh + 4
        parts.append(
            f"<g class='bar' data-type='{_e(t)}' data-count='{int(k)}'><title>{_e(t)}: {int(k)}/{int(n)} = {_pct(k / n)} "
            f"(95% CI {_pct(lo)}–{_pct(hi)})</title>"
            f"<text x='{lw - 6}' y='{y + 13}' font-size='12' text-anchor='end'>{_e(t)}</text>"
            f"<rect x='{lw}' y='{y + 2}' width='{bw * k / n:.1f}' height='{rh - 8}' fill='{_colour(t)}' opacity='0.85'/>"
            f"<line x1='{lw + bw * lo:.1f}' y1='{y + 8}' x2='{lw + bw * hi:.1f}' y2='{y + 8}' stroke='#1d2330' stroke-width='1.4'/>"
            f"<line x1='{lw + bw * lo:.1f}' y1='{y + 4}' x2='{lw + bw * lo:.1f}' y2='{y + 12}' stroke='#1d2330'/>"
            f"<line x1='{lw + bw * hi:.1f}' y1='{y + 4}' x2='{lw + bw * hi:.1f}' y2='{y + 12}' stroke='#1d2330'/>"
            f"<text x='{lw + bw + 8}' y='{y + 13}' font-size='11.5'>{int(k)} · {_pct(k / n)} [{_pct(lo, 0)}–{_pct(hi, 0)}]</text></g>")
    parts.append("</svg>")
    return "".join(parts)


def _stacked_bar(values: dict[str, int], order: tuple[str, ...], width: int = 260) -> _Html:
    n = sum(values.values())
    x, parts = 0.0, []
    for j, v in enumerate(order):
        k = values.get(v, 0)
        if not k:
            continue
        w = width * k / n
        parts.append(f"<rect x='{x:.1f}' y='0' width='{w:.1f}' height='14' fill='{_VALUE_COLOURS[j % len(_VALUE_COLOURS)]}'>"
                     f"<title>{_e(v)}: {k}/{n} ({_pct(k / n)})</title></rect>")
        x += w
    return _Html(f"<svg width='{int(width)}' height='14' xmlns='http://www.w3.org/2000/svg'>{''.join(parts)}</svg>")


def _attributes_html(cells: list[dict]) -> str:
    rows = []
    for a in ATTRIBUTE_NAMES:
        values: dict[str, int] = {}
        for c in cells:
            if c[a] is not None:
                values[c[a]] = values.get(c[a], 0) + 1
        if not values:
            continue
        order = ATTRIBUTES[a].values + tuple(sorted(set(values) - set(ATTRIBUTES[a].values)))
        n = sum(values.values())
        legend = " ".join(
            f"<span><i class='sw-v{j % len(_VALUE_COLOURS)}'></i>{_e(v)} {values[v]} ({_pct(values[v] / n, 0)})</span>"
            for j, v in enumerate(order) if values.get(v))
        rows.append([a.replace("_", " "), n, _stacked_bar(values, order), _Html(f"<span class='legend'>{legend}</span>")])
    if not rows:
        return "<p class='muted'>No caption attributes.</p>"
    return _table(["attribute", "cells", "distribution", "values"], rows, num={1})


def _positions_svg(cells: list[dict], width: int | None, height: int | None) -> str:
    """Cell centroids (level-0 px) over the slide extent; the job stores no slide image."""
    if not width or not height:
        xs = [c["centroid_x"] for c in cells] or [1]
        ys = [c["centroid_y"] for c in cells] or [1]
        width, height = int(max(xs) * 1.05) + 1, int(max(ys) * 1.05) + 1
    width, height = int(width), int(height)
    scale = 460 / max(width, height)
    w, h = max(40, int(width * scale)), max(40, int(height * scale))
    # dots shrink on crowded slides so that thousands of cells stay distinguishable
    r = max(width, height) / 140 / max(1.0, math.sqrt(len(cells) / 300))
    parts = [f"<svg class='positions' role='img' aria-label='cell positions' width='{w}' height='{h}' "
             f"viewBox='0 0 {width} {height}' preserveAspectRatio='xMidYMid meet' xmlns='http://www.w3.org/2000/svg'>",
             f"<rect x='0' y='0' width='{width}' height='{height}' fill='#fbf4f6' stroke='#adb5bd' stroke-width='{r / 3:.1f}'/>"]
    for c in cells:
        stroke = f" stroke='#000' stroke-width='{r / 2.5:.1f}'" if c["qc_flags"] else ""
        parts.append(f"<circle cx='{float(c['centroid_x']):.0f}' cy='{float(c['centroid_y']):.0f}' r='{r:.1f}' "
                     f"fill='{_colour(c['cell_type'])}' fill-opacity='0.8'{stroke}>"
                     f"<title>{_e(c['cell_type'] or 'untyped')} #{_e(c['cell_index'])}</title></circle>")
    parts.append("</svg>")
    present = []
    for t in list(CELL_TYPES) + [None]:
        if any(c["cell_type"] == t for c in cells):
            present.append(t)
    legend = "".join(f"<span><i class='{_swatch(t)}'></i>{_e(t or 'untyped')}</span>" for t in present)
    return (f"{''.join(parts)}<div class='legend'>{legend}<span><i class='sw-qc'></i>QC-flagged</span></div>"
            f"<div class='kv'>slide extent {width:,} × {height:,} px (level 0); one dot per cell centroid</div>")


def _thumb(data: bytes | None, px: int) -> str:
    if not data:
        return ""
    if px <= 0:
        return base64.b64encode(data).decode()
    try:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (px, px))  # JPEG: decode at a reduced scale when that still covers px
        img = img.convert("RGB")
    except Exception:  # noqa: BLE001 - a corrupt thumbnail must not sink the report; the card shows no image
        return ""
    if max(img.size) > px:
        img = img.resize((px, px), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=82)
    return base64.b64encode(buf.getvalue()).decode()


def _json_value(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _script_json(obj: object) -> str:
    """``obj`` as JSON that cannot end or re-mode the ``<script>`` block it sits in.

    ``<``, ``>`` and ``&`` only occur inside JSON strings, where ``\\u003c`` etc. mean the same,
    so ``</script``, ``<!--`` (which would switch the HTML tokenizer into its escaped states) and
    entity look-alikes never appear; U+2028/2029 are escaped for pre-ES2019 JavaScript parsers.
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _csp_hash(text: str) -> str:
    """CSP source expression allowing the inline element whose content is exactly ``text``."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def _status(status: object) -> _Html:
    return _Html(f"<span class='status-{_token(status)}'>{_e(status)}</span>")


def _oserror_cause(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _missing_dirs(out: Path) -> tuple[list[Path], Path]:
    """Directories above ``out`` that do not exist yet (deepest first) and the nearest that does."""
    missing, p = [], out.parent
    try:
        while not (p.exists() or p.is_symlink()) and p != p.parent:
            missing.append(p)
            p = p.parent
    except OSError as exc:  # e.g. a parent we may not search
        raise ReportOutputError(f"--out {_show(out)}: cannot look at {_show(p)}: {_oserror_cause(exc)}") from exc
    return missing, p


def _check_out(out: Path) -> None:
    """Raise :class:`ReportOutputError` when ``out`` plainly cannot be written (cheap checks only)."""
    _, p = _missing_dirs(out)
    try:
        is_dir = out.is_dir()
    except OSError as exc:
        raise ReportOutputError(f"--out {_show(out)}: {_oserror_cause(exc)}") from exc
    if is_dir:
        raise ReportOutputError(f"--out {_show(out)}: is a directory")
    if not p.is_dir():
        raise ReportOutputError(f"--out {_show(out)}: {_show(p)} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ReportOutputError(f"--out {_show(out)}: cannot create files in {_show(p)}: permission denied")


def _write_out(out: Path, data: bytes) -> int:
    """Write ``data`` to ``out`` all or nothing: a temporary file beside it, then a rename.

    On failure the temporary file and any directories this call created are removed, ``out``
    keeps its previous content, and :class:`ReportOutputError` names the path and the cause.
    Returns the number of bytes written.
    """
    missing, _ = _missing_dirs(out)
    created: list[Path] = []
    tmp, tmp_made = out.parent / f".{out.name[:100]}.{secrets.token_hex(6)}.tmp", False
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:  # made meanwhile by someone else: theirs, not ours to remove
                continue
            except OSError as exc:
                raise ReportOutputError(f"--out {_show(out)}: cannot create directory {_show(d)}: "
                                        f"{_oserror_cause(exc)}") from exc
            created.append(d)
        # 0o666 under the umask: the mode a plain open() would give the report
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        tmp_made = True
        with open(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException as exc:
        if tmp_made:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        for d in reversed(created):  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(exc, OSError) and not isinstance(exc, ReportOutputError):
            raise ReportOutputError(f"--out {_show(out)}: {_oserror_cause(exc)}") from exc
        raise
    return len(data)


def _resolve_slide(con, slide: str) -> str:
    hits = con.execute(
        "SELECT DISTINCT slide_id, slide_uri FROM slides WHERE slide_id = ? OR slide_uri = ? OR starts_with(slide_id, ?)",
        [slide, slide, slide]).fetchall()
    ids = sorted({h[0] for h in hits})
    if not ids:
        raise ConfigError(f"--slide {_show(slide)}: no such slide id, id prefix or URI in the outputs")
    if len(ids) > 1:
        raise ConfigError(f"--slide {_show(slide)}: ambiguous, matches {len(ids)} slides "
                          f"({', '.join(_show(i[:12]) for i in ids[:5])})")
    return ids[0]


def _unit_values(units: list[dict], cohort: str, cell_type: str, limit: int = 6) -> str:
    """A cohort's per-patient proportions of one cell type: median, then each value (or the range)."""
    mine = sorted((r for r in units if r["cohort"] == cohort and r["cell_type"] == cell_type), key=lambda r: r["unit"])
    if not mine:
        return "–"
    props = sorted(r["proportion"] for r in mine)
    k = len(props)
    median = props[k // 2] if k % 2 else (props[k // 2 - 1] + props[k // 2]) / 2
    detail = (", ".join(f"{r['unit']} {_pct(r['proportion'])}" for r in mine) if k <= limit
              else f"range {_pct(props[0])}–{_pct(props[-1])}")
    return f"median {_pct(median)} ({detail})"


def _cohort_html(result: CohortResult) -> str:
    """Patient level first (headline, per-patient proportions, the test or why there is none);
    cells pooled per cohort after it, under the descriptive-only label."""
    summary = summarize(result)
    unit = summary["unit"]
    d = result.differential.to_pylist()
    cohorts = sorted({r["cohort"] for r in d})
    units = result.units.to_pylist() if result.units.num_columns else []
    fmt = lambda p: "–" if p is None else f"{p:.3g}"  # noqa: E731
    out = ["<h3>Comparison between cohorts</h3>", f"<p>{_e(summary['headline'])}</p>",
           f"<p class='muted'>Units are {_e(unit)}s: cells of one {_e(unit)} are not independent samples, so cohorts "
           f"are compared on per-{_e(unit)} proportions of typed cells (two-sided Mann–Whitney U, exact permutation "
           f"distribution for small cohorts, Benjamini–Hochberg q). A pair of cohorts is tested only with at least "
           f"{MIN_UNITS_PER_COHORT} {_e(unit)}s in each and a smallest attainable p ≤ {ALPHA:g}.</p>"]
    rows = []
    for r in result.unit_comparison.to_pylist():
        rows.append([f"{r['cohort_a']} vs {r['cohort_b']}", r["cell_type"],
                     f"{r['cohort_a']}: {_unit_values(units, r['cohort_a'], r['cell_type'])}",
                     f"{r['cohort_b']}: {_unit_values(units, r['cohort_b'], r['cell_type'])}",
                     fmt(r["p_value"]), fmt(r["q_value"]),
                     "" if r["testable"] else f"not tested: smallest attainable p {fmt(r['min_attainable_p'])}"])
    out.append(_table(["cohorts", "cell type", f"A (per {unit})", f"B (per {unit})", "p", "q (BH)", "note"], rows))
    out.append(f"<h3>Cells pooled per cohort <span class='muted'>({_e(POOLED_SCOPE)})</span></h3>"
               "<p class='muted'>Differential counts with 95% Wilson intervals over all typed cells of a cohort; the "
               f"intervals treat cells as independent and describe these cells, not the {_e(unit)}s they come from.</p>")
    for cohort in cohorts:
        rows_c = [r for r in d if r["cohort"] == cohort]
        counts = {r["cell_type"]: r["count"] for r in rows_c}
        meta = rows_c[0] if rows_c else {}
        out.append(f"<h3>{_e(cohort)} <span class='muted'>({_e(meta.get('slides', 0))} slides, "
                   f"{_e(meta.get('patients', 0))} patients, {_e(meta.get('typed_cells', 0))} typed cells)</span></h3>")
        out.append(_differential_svg(counts))
    rows = []
    for r in result.comparison.to_pylist():
        rows.append([f"{r['cohort_a']} vs {r['cohort_b']}", r["cell_type"],
                     f"{r['count_a']}/{r['typed_a']} ({_pct(r['proportion_a'])})",
                     f"{r['count_b']}/{r['typed_b']} ({_pct(r['proportion_b'])})",
                     f"{_pct(r['difference'])} [{_pct(r['diff_ci_low'])}, {_pct(r['diff_ci_high'])}]",
                     fmt(r["p_value"]), fmt(r["q_value"])])
    out.append(f"<details><summary>Cell-level test ({_e(POOLED_SCOPE)})</summary><p class='muted'>Fisher's exact "
               "test on the pooled 2×2 table (type vs other typed cells), Newcombe 95% interval of the difference, "
               f"Benjamini–Hochberg q. Every cell counts as an independent sample, so these p-values overstate the "
               f"evidence and say nothing about a difference between {_e(unit)}s.</p>"
               + _table(["cohorts", "cell type", "A", "B", "difference [95% CI]", "p (pooled cells)",
                         "q (pooled cells)"], rows) + "</details>")
    freq: dict[tuple[str, str, str], dict[str, dict]] = {}
    for r in result.attributes.to_pylist():
        freq.setdefault((r["cell_type"], r["attribute"], r["value"]), {})[r["cohort"]] = r
    type_rank = {t: i for i, t in enumerate(CELL_TYPES)}
    attr_rank = {a: i for i, a in enumerate(ATTRIBUTE_NAMES)}
    keys = sorted(freq, key=lambda k: (type_rank.get(k[0], 99), k[0], attr_rank.get(k[1], 99), k[2]))
    rows = [[t, a.replace("_", " "), v] + [
        (f"{freq[(t, a, v)][c]['count']}/{freq[(t, a, v)][c]['mentioned']} ({_pct(freq[(t, a, v)][c]['frequency'], 0)})"
         if c in freq[(t, a, v)] else "–") for c in cohorts] for t, a, v in keys]
    out.append(f"<details><summary>Attribute frequencies per cell type and cohort ({len(rows)} rows; cells pooled, "
               "descriptive)</summary>"
               + _table(["cell type", "attribute", "value", *cohorts], rows) + "</details>")
    if result.unmatched_manifest:
        out.append("<h3>Manifest rows without cells</h3><ul>" + "".join(f"<li>{_e(m)}</li>" for m in result.unmatched_manifest) + "</ul>")
    if result.unlisted_slides:
        out.append(f"<p class='muted'>{len(result.unlisted_slides)} slide(s) with cells are not in the manifest.</p>")
    return "".join(out)


def build_report(outputs: Outputs | str, out: str | Path, *, slide: str | None = None,
                 manifest: str | Path | None = None, s3_endpoint: str | None = None,
                 thumb_px: int = 112, page_size: int = 100) -> ReportStats:
    """Write the report to ``out``; returns what it contains and how long it took.

    ``slide``: a slide id, unique id prefix or URI (default: every slide with cells).
    ``thumb_px``: side the stored thumbnails are re-encoded to (0 keeps the stored JPEG bytes).
    """
    if page_size < 1:
        raise ConfigError(f"--page-size must be >= 1, got {page_size}")
    t0 = time.perf_counter()
    out = Path(out)
    _check_out(out)  # before the work: a bad --out should not cost a full build to find out
    if not isinstance(outputs, Outputs):
        outputs = open_outputs(outputs, s3_endpoint=s3_endpoint)
    con = connect(outputs)
    slide_id = _resolve_slide(con, slide) if slide else None
    where, params = ("WHERE slide_id = ?", [slide_id]) if slide_id else ("", [])

    runs = con.sql("SELECT * EXCLUDE (config_json) FROM runs ORDER BY started_at DESC").to_arrow_table().to_pylist()
    # a skip is no outcome: current_slides keeps each slide's latest ok/failed row
    slides_latest = con.sql(f"""
        SELECT slide_id, slide_uri, status, reason, finished_at
        FROM current_slides {where} ORDER BY slide_uri, slide_id""", params=params).to_arrow_table().to_pylist()
    ok_slides = {r["slide_id"]: r for r in con.sql(f"""
        SELECT slide_id, arg_max(slide_uri, finished_at) AS slide_uri, arg_max(run_id, finished_at) AS run_id,
               arg_max(width, finished_at) AS width, arg_max(height, finished_at) AS height,
               arg_max(mpp, finished_at) AS mpp, arg_max(mpp_source, finished_at) AS mpp_source,
               arg_max(model_version, finished_at) AS model_version, max(finished_at) AS finished_at
        FROM slides WHERE status = 'ok' {where.replace('WHERE', 'AND')} GROUP BY slide_id""", params=params
    ).to_arrow_table().to_pylist()}
    cols = ", ".join(f'"{c}"' for c in _GALLERY_COLS if c != "slide_name")
    cells_tbl = con.sql(
        f"SELECT {cols}, slide_uri, thumbnail_jpeg FROM current_cells {where} ORDER BY slide_uri, cell_index",
        params=params).to_arrow_table()
    thumbs = cells_tbl.column("thumbnail_jpeg").to_pylist()
    cells = cells_tbl.drop_columns(["thumbnail_jpeg"]).to_pylist()
    for c, th in zip(cells, thumbs):
        c["slide_name"] = _name(c["slide_uri"])
        c["_thumb"] = th
    type_rank = {t: i for i, t in enumerate(CELL_TYPES)}
    cells.sort(key=lambda c: (type_rank.get(c["cell_type"], len(CELL_TYPES) + (c["cell_type"] is None)),
                              c["cell_type"] or "", c["slide_uri"], c["cell_index"]))

    by_slide: dict[str, list[dict]] = {}
    for c in cells:
        by_slide.setdefault(c["slide_id"], []).append(c)
    cons = consistency_summary(cells)
    cohort = cohort_analysis(outputs, manifest, allow_unknown=True) if manifest else None

    loc = outputs.location
    style = STYLE + _SWATCH_CSS
    # the policy comes first in <head> so that it governs everything after it
    csp = (f"default-src 'none'; img-src data:; style-src {_csp_hash(style)}; script-src {_csp_hash(SCRIPT)}; "
           "base-uri 'none'; form-action 'none'")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta http-equiv='Content-Security-Policy' content=\"{csp}\">"
             "<meta name='referrer' content='no-referrer'>"
             "<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>HemBLIP cell report – {_e(_name(loc))}</title><style>{style}</style></head><body>"
             f"<header><h1>HemBLIP blood-smear cell report</h1><div class='sub'>{_e(loc)}"
             f"{' · slide ' + _e(slide_id) if slide_id else ''} · {len(by_slide)} slides with cells · {len(cells):,} cells · "
             f"generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC</div></header>"
             "<nav class='toc'><a href='#runs'>Runs</a><a href='#consistency'>Consistency</a>"
             + ("<a href='#cohorts'>Cohorts</a>" if cohort else "") + "<a href='#slides'>Slides</a><a href='#cells'>Cell gallery</a></nav><main>"]

    # --- runs
    run_rows = [[_e(r["run_id"]), _e(f"{r['started_at']:%Y-%m-%d %H:%M}" if r["started_at"] else ""),
                 _e(f"{(r['finished_at'] - r['started_at']).total_seconds() / 60:.1f} min" if r["finished_at"] and r["started_at"] else ""),
                 _status(r["status"]), str(r["slides_listed"]), str(r["slides_ok"]),
                 str(r["slides_failed"]), str(r["slides_skipped"]), f"{r['cells_written']:,}" if r["cells_written"] is not None else "",
                 _e(r["model_version"])] for r in runs]
    parts.append("<section id='runs'><h2>Run summary</h2>")
    parts.append(_table(["run", "started (UTC)", "duration", "status", "listed", "ok", "failed", "skipped", "cells", "model"],
                        run_rows, num={4, 5, 6, 7, 8}) if runs else "<p class='muted'>No runs recorded.</p>")
    if runs:
        # the latest outcome per slide, not the last run's rows: a re-run that skipped everything
        # writes none, and a corrupt slide must stay listed until a later ok row supersedes it
        failures = con.execute(f"""
            SELECT c.slide_uri, c.reason, c.run_id, c.finished_at,
                   (SELECT count(*) FROM slides s WHERE s.slide_id = c.slide_id AND s.status = 'failed') AS attempts
            FROM current_slides c WHERE c.status = 'failed' {where.replace('WHERE slide_id', 'AND c.slide_id')}
            ORDER BY c.slide_uri, c.slide_id""", params).fetchall()
        parts.append(f"<h3>Slides failing now (latest outcome per slide): {len(failures)}</h3>"
                     "<p class='muted'>A failed slide stays listed until a later run processes it ok (the same "
                     "bytes retried, or new bytes at the same URI); runs that skip it do not change it. Last run "
                     f"{_e(runs[0]['run_id'])}: {_e(runs[0]['slides_ok'])} ok, {_e(runs[0]['slides_failed'])} failed, "
                     f"{_e(runs[0]['slides_skipped'])} skipped.</p>")
        if failures:
            parts.append(_table(
                ["slide", "reason", "last attempt (run)", "at (UTC)", "failed attempts"],
                [[_e(u), _e(r), _e(rid), _e(f"{t:%Y-%m-%d %H:%M}" if t else ""), str(n)] for u, r, rid, t, n in failures],
                num={4}))
    parts.append("</section>")

    # --- consistency
    pa_rows = [[_e(r["attribute"].replace("_", " ")), str(r["comparable"]), str(r["inconsistent"]), _pct(r["inconsistent_rate"])]
               for r in cons["per_attribute"].to_pylist()]
    ps_rows = [[_e(_name(ok_slides.get(r["slide_id"], {}).get("slide_uri", r["slide_id"]))), str(r["cells"]), str(r["checked"]),
                str(r["inconsistent"]), _pct(r["inconsistent_rate"])] for r in cons["per_slide"].to_pylist()]
    parts.append("<section id='consistency'><h2>Caption ⇄ morphometry consistency</h2><p class='muted'>A caption's cell size, "
                 "N:C ratio and segmented/unsegmented nucleus are compared with the measured diameter, nucleus/cytoplasm "
                 "area ratio and lobe count (thresholds calibrated on WBCAtt-labelled PBC cells).</p><div class='slide-grid'><div>"
                 + _table(["attribute", "comparable", "disagree", "rate"], pa_rows, num={1, 2, 3}) + "</div><div>"
                 + _table(["slide", "cells", "checked", "disagree", "rate"], ps_rows, num={1, 2, 3, 4}) + "</div></div></section>")

    if cohort:
        parts.append(f"<section id='cohorts'><h2>Cohorts</h2>{_cohort_html(cohort)}</section>")

    # --- slides
    parts.append("<section id='slides'><h2>Slides</h2>")
    status_rows = [[_e(_name(r["slide_uri"])), _status(r["status"]),
                    _e(r["reason"] or ""), str(len(by_slide.get(r["slide_id"], [])))] for r in slides_latest]
    parts.append(_table(["slide", "current outcome", "reason", "cells"], status_rows, num={3}))
    for sid, scells in sorted(by_slide.items(), key=lambda kv: kv[1][0]["slide_uri"]):
        info = ok_slides.get(sid, {})
        counts: dict[str | None, int] = {}
        flags: dict[str, int] = {}
        for c in scells:
            counts[c["cell_type"]] = counts.get(c["cell_type"], 0) + 1
            for f in c["qc_flags"] or []:
                flags[f] = flags.get(f, 0) + 1
        typed = sum(v for t, v in counts.items() if t is not None)
        abnormal = sum(v for t, v in counts.items() if t in ABNORMAL_CELL_TYPES)
        mpp = info.get("mpp")
        mpp_text = f"{float(mpp):.4f} µm/px ({_e(info.get('mpp_source'))})" if mpp else "mpp unknown"
        parts.append(
            f"<div class='slide' id='slide-{_e(sid)}' data-slide='{_e(sid)}'><h3>{_e(_name(scells[0]['slide_uri']))}</h3>"
            f"<div class='kv'>{_e(scells[0]['slide_uri'])} · id {_e(sid)} · run {_e(info.get('run_id'))} · "
            f"{mpp_text} · {len(scells)} cells, "
            f"{typed} typed, {counts.get(None, 0)} untyped · atypical/blast-type {abnormal} ({_pct(abnormal / typed if typed else None)}) · "
            f"QC flags: {', '.join(f'{_e(k)} {v}' for k, v in sorted(flags.items())) or 'none'} · "
            # no inline handler: the page script finds the link by data-show-slide
            f"<a href='#slide={_e(quote(sid, safe=''))}' data-show-slide='{_e(sid)}'>show its cells</a></div>"
            f"<div class='slide-grid'><div><h3>Differential count (95% Wilson CI)</h3>{_differential_svg(counts)}</div>"
            f"<div><h3>Where cells were found</h3>{_positions_svg(scells, info.get('width'), info.get('height'))}</div></div>"
            f"<details><summary>Attribute distributions ({len(scells)} cells)</summary>{_attributes_html(scells)}</details></div>")
    parts.append("</section>")

    # --- gallery
    present_types = sorted({c["cell_type"] for c in cells if c["cell_type"]}, key=lambda t: type_rank.get(t, 99))
    type_opts = "".join(f"<option value='{_e(t)}'>{_e(t)}</option>" for t in present_types)
    if any(c["cell_type"] is None for c in cells):
        type_opts += "<option value='(untyped)'>(untyped)</option>"
    flag_opts = "".join(f"<option value='{_e(f)}'>{_e(f)}</option>" for f in QC_FLAGS)
    slide_opts = "".join(f"<option value='{_e(s)}'>{_e(_name(v[0]['slide_uri']))}</option>" for s, v in by_slide.items())
    parts.append(
        "<section id='cells'><h2>Cell gallery</h2><div class='controls'>"
        f"<label>slide <select id='f-slide'><option value=''>all</option>{slide_opts}</select></label>"
        f"<label>cell type <select id='f-type'><option value=''>all</option>{type_opts}</select></label>"
        f"<label>QC flag <select id='f-flag'><option value=''>all</option><option value='(none)'>no flag</option>"
        f"<option value='(any)'>any flag</option>{flag_opts}</select></label>"
        "<label>consistency <select id='f-consistency'><option value=''>all</option><option value='inconsistent'>disagrees</option>"
        "<option value='consistent'>agrees</option><option value='unchecked'>not comparable</option></select></label>"
        "<span class='pager'><button id='p-prev' type='button'>◀ prev</button><button id='p-next' type='button'>next ▶</button></span>"
        "<span id='gallery-count'></span></div><div id='gallery' class='gallery'></div></section>")
    blob = {
        "columns": _GALLERY_COLS, "attribute_names": list(ATTRIBUTE_NAMES), "page_size": page_size,
        "rows": [[_json_value(c[k]) for k in _GALLERY_COLS] for c in cells],
        "thumbnails": [_thumb(c["_thumb"], thumb_px) for c in cells],
    }
    parts.append(f"</main><script id='cell-data' type='application/json'>{_script_json(blob)}</script>"
                 f"<script>{SCRIPT}</script></body></html>")
    size = _write_out(out, "".join(parts).encode("utf-8"))
    return ReportStats(path=out, slides=len(by_slide), cells=len(cells), bytes=size,
                       seconds=time.perf_counter() - t0)


