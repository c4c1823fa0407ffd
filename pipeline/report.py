"""Static, self-contained HTML report of the outputs (one file: inline CSS/JS/SVG, data-URI images).

Sections: run summary (runs, slides failing now: each slide's latest outcome), caption ⇄ morphometry consistency, optional
cohort tables, per slide (differential count with 95% Wilson intervals, attribute distributions,
where cells were found drawn over the slide extent, QC flags; for a whole smear read by zone, the
stored zone map with the described cells on it, each zone's area and the cells seen outside the
chosen zones, and the per-slide budget's sample), and a cell gallery grouped by cell
type with filters (slide, type, QC flag, consistency) kept in the URL hash, e.g.
``report.html#type=lymphocyte&flag=out_of_focus``. Cell data travel as one JSON blob and the
gallery renders pages of ``page_size`` cells, so thousands of cells stay responsive.

Three parts: :mod:`pipeline.report_queries` reads what is shown (only stored data: the
``thumbnail_jpeg`` column, re-encoded to ``thumb_px`` to keep the file small, never the slides);
this module turns it into view data (chart geometry inputs, per-slide summaries) and renders the
Jinja2 template ``pipeline/_report_assets/report.html.j2``; the page needs no network at view time.

Every stored string is treated as hostile (S3 keys, captions and QC flags come from outside): the
template is rendered with autoescaping on, so each value is escaped for HTML text and quoted
attributes alike; the cell data go into a JSON block with ``<``, ``>``, ``&``, U+2028/2029
escaped (:func:`_script_json`); URL hashes are percent-encoded; the page has no inline event
handlers or style attributes, and a Content Security Policy allows only the page's own ``<style>``
and ``<script>`` (by SHA-256 hash) and ``data:`` images. The file is written to a temporary name
beside ``--out`` and renamed, so a failed write leaves no part.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
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

import jinja2
from markupsafe import Markup
from PIL import Image

from hemblip.ontology import ABNORMAL_CELL_TYPES, ATTRIBUTE_NAMES, ATTRIBUTES, CELL_TYPES
from pipeline._report_assets import ASSETS_DIR, SCRIPT, STYLE, TEMPLATE
from pipeline.cohort import (
    ALPHA,
    MIN_UNITS_PER_COHORT,
    POOLED_SCOPE,
    CohortResult,
    summarize,
    wilson_interval,
)
from pipeline.errors import ConfigError, PipelineError
from pipeline.outputs import Outputs, open_outputs
from pipeline.report_queries import GALLERY_COLUMNS, ReportData, load_report_data, slide_name
from pipeline.schema import QC_FLAGS

__all__ = ["ReportStats", "ReportOutputError", "build_report", "render_report", "TYPE_COLOURS"]

TYPE_COLOURS: dict[str | None, str] = dict(
    zip(
        CELL_TYPES,
        [
            "#1c7ed6",
            "#e8590c",
            "#7048e8",
            "#2f9e44",
            "#f08c00",
            "#c92a2a",
            "#a61e4d",
            "#862e9c",
            "#5c940d",
            "#0b7285",
            "#d6336c",
            "#e03131",
            "#364fc7",
        ],
    )
) | {None: "#868e96"}
_VALUE_COLOURS = ["#4c6ef5", "#f76707", "#37b24d", "#ae3ec9", "#f59f00", "#15aabf", "#e64980"]
_OTHER_COLOUR = "#495057"
# colours come from fixed lists, never from data, and reach the page as classes: a CSP that
# forbids style attributes still lets the page's own (hashed) stylesheet colour the legends
_SWATCH_CSS = "".join(
    [f".sw-t{i}{{background:{c}}}" for i, c in enumerate(TYPE_COLOURS.values())]
    + [
        f".legend i.sw-v{j}{{background:{c};border-radius:2px}}"
        for j, c in enumerate(_VALUE_COLOURS)
    ]
    + [f".sw-other{{background:{_OTHER_COLOUR}}}", ".sw-qc{background:#fff;border:2px solid #000}"]
)


@dataclass(frozen=True)
class ReportStats:
    """What :func:`build_report` wrote: ``bytes`` of the file, ``seconds`` of wall time."""

    path: Path
    slides: int
    cells: int
    bytes: int
    seconds: float


class ReportOutputError(PipelineError, OSError):
    """``--out`` cannot be written (a parent is a file, no permission, disk full, ...).

    ``str(err)`` is ``"--out <path>: <cause>"``, one line.
    """


def _show(x: object) -> str:
    """A path or id for a one-line message: control characters (newlines) shown escaped."""
    s = str(x)
    return s if s.isprintable() else ascii(s)


# ---- template filters: plain text out (the template escapes it)


def _token(x: object) -> str:
    """A stored value reduced to a CSS class-name fragment (letters, digits, ``-``, ``_``)."""
    return re.sub(r"[^a-z0-9_-]", "-", str(x).lower())[:40]


def _colour(t: str | None) -> str:
    return TYPE_COLOURS.get(t, _OTHER_COLOUR)


def _swatch(t: str | None) -> str:
    keys = list(TYPE_COLOURS)
    return f"sw-t{keys.index(t)}" if t in TYPE_COLOURS else "sw-other"


def _pct(x: float | None, d: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{d}f}%"


def _g3(p: float | None) -> str:
    return "–" if p is None else f"{p:.3g}"


def _minute(t: datetime | None) -> str:
    return f"{t:%Y-%m-%d %H:%M}" if t else ""


def _duration(run: dict) -> str:
    """Wall time of a run in minutes (empty while it has not finished)."""
    if not (run.get("finished_at") and run.get("started_at")):
        return ""
    return f"{(run['finished_at'] - run['started_at']).total_seconds() / 60:.1f} min"


def _thousands(n: int | None) -> str:
    return "" if n is None else f"{int(n):,}"


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(ASSETS_DIR),
        autoescape=True,  # every page is HTML: escape everything, no per-extension guessing
        undefined=jinja2.StrictUndefined,  # a misspelt field fails the build, not a blank cell
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=lambda v: "" if v is None else v,  # a missing value shows as nothing, not "None"
    )
    env.filters.update(
        name=slide_name,
        token=_token,
        colour=_colour,
        swatch=_swatch,
        pct=_pct,
        g3=_g3,
        minute=_minute,
        duration=_duration,
        thousands=_thousands,
        urlpart=lambda s: quote(str(s), safe=""),
        f0=lambda x: f"{float(x):.0f}",
        f1=lambda x: f"{float(x):.1f}",
        f2=lambda x: f"{float(x):.2f}",
        f4=lambda x: f"{float(x):.4f}",
    )
    return env


_ENV = _env()


# ---- view data: what each chart and block needs, computed from the queried data


def _differential(counts: dict[str | None, int]) -> dict:
    """Bars of each cell type's share of the ``n`` typed cells with its 95% Wilson interval."""
    n = sum(v for t, v in counts.items() if t is not None)
    types = [t for t in CELL_TYPES if counts.get(t)] + sorted(
        t for t in counts if t and t not in CELL_TYPES
    )
    bars = []
    for t in types:
        lo, hi = wilson_interval(counts[t], n)
        bars.append({"type": t, "k": int(counts[t]), "lo": lo, "hi": hi})
    return {"n": int(n), "bars": bars}


def _positions(cells: list[dict], width: int | None, height: int | None) -> dict:
    """Extent (level-0 px), drawn size (px) and dot radius of the cell-position map."""
    if not width or not height:
        xs = [c["centroid_x"] for c in cells] or [1]
        ys = [c["centroid_y"] for c in cells] or [1]
        width, height = int(max(xs) * 1.05) + 1, int(max(ys) * 1.05) + 1
    width, height = int(width), int(height)
    scale = 460 / max(width, height)
    present = {c["cell_type"] for c in cells}
    return {
        "width": width,
        "height": height,
        "w": max(40, int(width * scale)),
        "h": max(40, int(height * scale)),
        # dots shrink on crowded slides so that thousands of cells stay distinguishable
        "r": max(width, height) / 140 / max(1.0, math.sqrt(len(cells) / 300)),
        "cells": cells,
        "legend": [t for t in [*CELL_TYPES, None] if t in present],
    }


def _attributes(cells: list[dict]) -> list[dict]:
    """Per caption attribute: cells mentioning it and the count of each value (ontology order)."""
    rows = []
    for a in ATTRIBUTE_NAMES:
        values: dict[str, int] = {}
        for c in cells:
            if c[a] is not None:
                values[c[a]] = values.get(c[a], 0) + 1
        if not values:
            continue
        order = ATTRIBUTES[a].values + tuple(sorted(set(values) - set(ATTRIBUTES[a].values)))
        segments = [
            {
                "j": j % len(_VALUE_COLOURS),
                "colour": _VALUE_COLOURS[j % len(_VALUE_COLOURS)],
                "value": v,
                "k": values[v],
            }
            for j, v in enumerate(order)
            if values.get(v)
        ]
        rows.append({"attribute": a, "n": sum(values.values()), "segments": segments})
    return rows


#: Largest stored zone-map PNG the report shows (bytes, pixels a side): the job writes at most
#: 512 px; anything bigger is not ours and is left out rather than decoded.
_ZONE_PNG_MAX_BYTES = 2 * 2**20
_ZONE_PNG_MAX_SIDE = 1024


def _zone_png_uri(data: object) -> str | None:
    """A ``data:image/png;base64,...`` URI of a stored zone map, or None when it is missing or
    not a small PNG. The stored bytes are anyone's: they are decoded within a pixel budget and
    re-encoded, so only pixels reach the page (no text chunks, no other format)."""
    if not isinstance(data, bytes | bytearray) or not data or len(data) > _ZONE_PNG_MAX_BYTES:
        return None
    if bytes(data[:8]) != b"\x89PNG\r\n\x1a\n":
        return None
    try:
        img = Image.open(io.BytesIO(bytes(data)), formats=["PNG"])
        if max(img.size) > _ZONE_PNG_MAX_SIDE:
            return None
        img = img.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, "PNG", optimize=True)
    except Exception:  # noqa: BLE001 - a corrupt map must not sink the report; the block says so
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _pairs(value: object) -> dict[str, float]:
    """A stored map column (DuckDB gives ``[(key, value)]``; a dict also works) as a dict with
    finite numbers only."""
    items = value.items() if isinstance(value, dict) else value or []
    out: dict[str, float] = {}
    for item in items:
        try:
            k, v = item
        except (TypeError, ValueError):
            continue
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[str(k)] = v
    return out


def _zones_view(info: dict) -> dict | None:
    """The slide's smear-zone panel: the zone-map image (described cells as dots), each zone's
    area (mm²) and cells seen there but not described, and the cell budget; None for a slide
    read whole without a budget (or written before the zone columns existed)."""
    selected = [str(z) for z in info.get("zones_selected") or []]
    if not selected and not info.get("sampled"):
        return None
    areas = _pairs(info.get("zone_areas_mm2"))
    outside = _pairs(info.get("cells_outside_zones"))
    from pipeline.zones import ZONE_NAMES

    names = [z for z in ZONE_NAMES if z in areas or z in outside] + sorted(
        (set(areas) | set(outside)) - set(ZONE_NAMES)
    )
    return {
        "selected": selected,
        "png": _zone_png_uri(info.get("zone_map_png")),
        "rows": [
            {
                "zone": z,
                "area": areas.get(z),
                "selected": z in selected,
                "outside": None if z in selected else outside.get(z),
            }
            for z in names
        ],
        "cells_total": info.get("cells_total"),
        "cell_count": info.get("cell_count"),
        "sampled": bool(info.get("sampled")),
        "estimated": bool(info.get("cells_total_estimated")),
    }


def _slide_view(sid: str, cells: list[dict], info: dict) -> dict:
    counts: dict[str | None, int] = {}
    flags: dict[str, int] = {}
    for c in cells:
        counts[c["cell_type"]] = counts.get(c["cell_type"], 0) + 1
        for f in c["qc_flags"] or []:
            flags[f] = flags.get(f, 0) + 1
    return {
        "slide_id": sid,
        "slide_uri": cells[0]["slide_uri"],
        "run_id": info.get("run_id"),
        "mpp": info.get("mpp"),
        "mpp_source": info.get("mpp_source"),
        "cells": cells,
        "typed": sum(v for t, v in counts.items() if t is not None),
        "untyped": counts.get(None, 0),
        "abnormal": sum(v for t, v in counts.items() if t in ABNORMAL_CELL_TYPES),
        "flags": sorted(flags.items()),
        "differential": _differential(counts),
        "positions": _positions(cells, info.get("width"), info.get("height")),
        "attributes": _attributes(cells),
        "zones": _zones_view(info),
    }


def _unit_values(units: list[dict], cohort: str, cell_type: str, limit: int = 6) -> str:
    """A cohort's per-patient proportions of one cell type: median, then each value (or the range)."""
    mine = sorted(
        (r for r in units if r["cohort"] == cohort and r["cell_type"] == cell_type),
        key=lambda r: r["unit"],
    )
    if not mine:
        return "–"
    props = sorted(r["proportion"] for r in mine)
    k = len(props)
    median = props[k // 2] if k % 2 else (props[k // 2 - 1] + props[k // 2]) / 2
    detail = (
        ", ".join(f"{r['unit']} {_pct(r['proportion'])}" for r in mine)
        if k <= limit
        else f"range {_pct(props[0])}–{_pct(props[-1])}"
    )
    return f"median {_pct(median)} ({detail})"


def _cohort_view(result: CohortResult) -> dict:
    summary = summarize(result)
    d = result.differential.to_pylist()
    cohorts = sorted({r["cohort"] for r in d})
    units = result.units.to_pylist() if result.units.num_columns else []
    unit_rows = [
        {
            **r,
            "values_a": _unit_values(units, r["cohort_a"], r["cell_type"]),
            "values_b": _unit_values(units, r["cohort_b"], r["cell_type"]),
        }
        for r in result.unit_comparison.to_pylist()
    ]
    pooled = []
    for cohort in cohorts:
        rows_c = [r for r in d if r["cohort"] == cohort]
        meta = rows_c[0] if rows_c else {}
        pooled.append(
            {
                "cohort": cohort,
                "slides": meta.get("slides", 0),
                "patients": meta.get("patients", 0),
                "typed_cells": meta.get("typed_cells", 0),
                "differential": _differential({r["cell_type"]: r["count"] for r in rows_c}),
            }
        )
    freq: dict[tuple[str, str, str], dict[str, dict]] = {}
    for r in result.attributes.to_pylist():
        freq.setdefault((r["cell_type"], r["attribute"], r["value"]), {})[r["cohort"]] = r
    type_rank = {t: i for i, t in enumerate(CELL_TYPES)}
    attr_rank = {a: i for i, a in enumerate(ATTRIBUTE_NAMES)}
    keys = sorted(
        freq, key=lambda k: (type_rank.get(k[0], 99), k[0], attr_rank.get(k[1], 99), k[2])
    )
    return {
        "headline": summary["headline"],
        "unit": summary["unit"],
        "min_units": MIN_UNITS_PER_COHORT,
        "alpha": f"{ALPHA:g}",
        "scope": POOLED_SCOPE,
        "cohorts": cohorts,
        "unit_rows": unit_rows,
        "pooled": pooled,
        "comparison": result.comparison.to_pylist(),
        "attribute_rows": [
            {
                "cell_type": t,
                "attribute": a,
                "value": v,
                "per_cohort": [freq[(t, a, v)].get(c) for c in cohorts],
            }
            for t, a, v in keys
        ],
        "unmatched": result.unmatched_manifest,
        "unlisted": len(result.unlisted_slides),
    }


# ---- the JSON blob and the page


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
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _csp_hash(text: str) -> str:
    """CSP source expression allowing the inline element whose content is exactly ``text``."""
    return (
        "'sha256-"
        + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
        + "'"
    )


def render_report(data: ReportData, *, thumb_px: int = 112, page_size: int = 100) -> str:
    """The report page (HTML text) for ``data``; ``thumb_px`` as in :func:`build_report`."""
    type_rank = {t: i for i, t in enumerate(CELL_TYPES)}
    cells = data.cells
    blob = {
        "columns": GALLERY_COLUMNS,
        "attribute_names": list(ATTRIBUTE_NAMES),
        "page_size": page_size,
        "rows": [[_json_value(c[k]) for k in GALLERY_COLUMNS] for c in cells],
        "thumbnails": [_thumb(c["thumbnail_jpeg"], thumb_px) for c in cells],
    }
    style = STYLE + _SWATCH_CSS
    ok_uri = {sid: r["slide_uri"] for sid, r in data.ok_slides.items()}
    consistency = {
        "per_attribute": data.consistency["per_attribute"].to_pylist(),
        "per_slide": [
            {**r, "slide_uri": ok_uri.get(r["slide_id"], r["slide_id"])}
            for r in data.consistency["per_slide"].to_pylist()
        ],
    }
    slides = [
        _slide_view(sid, scells, data.ok_slides.get(sid, {}))
        for sid, scells in sorted(data.by_slide.items(), key=lambda kv: kv[1][0]["slide_uri"])
    ]
    return _ENV.get_template(TEMPLATE).render(
        data=data,
        consistency=consistency,
        cohort=_cohort_view(data.cohort) if data.cohort else None,
        slides=slides,
        types={
            "present": sorted(
                {c["cell_type"] for c in cells if c["cell_type"]},
                key=lambda t: (type_rank.get(t, 99), t),
            ),
            "untyped": any(c["cell_type"] is None for c in cells),
        },
        qc_flags=QC_FLAGS,
        # the page's own texts, trusted as markup; the policy allows exactly these two by hash
        csp=f"default-src 'none'; img-src data:; style-src {_csp_hash(style)}; script-src {_csp_hash(SCRIPT)}; "
        "base-uri 'none'; form-action 'none'",
        style=Markup(style),
        script=Markup(SCRIPT),
        cell_json=Markup(_script_json(blob)),
        generated=datetime.now(UTC),
    )


# ---- writing --out all or nothing


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
        raise ReportOutputError(
            f"--out {_show(out)}: cannot look at {_show(p)}: {_oserror_cause(exc)}"
        ) from exc
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
        raise ReportOutputError(
            f"--out {_show(out)}: cannot create files in {_show(p)}: permission denied"
        )


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
                raise ReportOutputError(
                    f"--out {_show(out)}: cannot create directory {_show(d)}: {_oserror_cause(exc)}"
                ) from exc
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


def build_report(
    outputs: Outputs | str,
    out: str | Path,
    *,
    slide: str | None = None,
    manifest: str | Path | None = None,
    s3_endpoint: str | None = None,
    thumb_px: int = 112,
    page_size: int = 100,
    storage_options=None,
) -> ReportStats:
    """Write the report to ``out``; returns what it contains and how long it took.

    ``slide``: a slide id, unique id prefix or URI (default: every slide with cells).
    ``thumb_px``: side in px the stored thumbnails are re-encoded to (0 keeps the stored JPEG bytes).
    ``page_size``: gallery cells per page (>= 1).
    ``s3_endpoint``/``storage_options``: how to reach S3 (:func:`pipeline.outputs.open_outputs`).
    """
    if page_size < 1:
        raise ConfigError(f"--page-size must be >= 1, got {page_size}")
    t0 = time.perf_counter()
    out = Path(out)
    _check_out(out)  # before the work: a bad --out should not cost a full build to find out
    if not isinstance(outputs, Outputs):
        outputs = open_outputs(outputs, s3_endpoint=s3_endpoint, storage_options=storage_options)
    data = load_report_data(outputs, slide=slide, manifest=manifest)
    size = _write_out(
        out, render_report(data, thumb_px=thumb_px, page_size=page_size).encode("utf-8")
    )
    return ReportStats(
        path=out,
        slides=len(data.by_slide),
        cells=len(data.cells),
        bytes=size,
        seconds=time.perf_counter() - t0,
    )
