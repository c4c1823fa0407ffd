"""What the HTML report shows, read from the outputs: plain Python data, no markup.

:func:`load_report_data` runs every query of the report (DuckDB over the outputs' views, see
:mod:`pipeline.query`) and returns a :class:`ReportData`; :mod:`pipeline.report` renders it
through the page template. Only stored data are read (the ``thumbnail_jpeg`` column, never the
slides). Every string in the result is stored data, i.e. anyone's input: the renderer escapes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hemblip.ontology import ATTRIBUTE_NAMES, CELL_TYPES
from pipeline.cohort import CohortResult, cohort_analysis
from pipeline.consistency import consistency_summary
from pipeline.errors import ConfigError
from pipeline.outputs import Outputs
from pipeline.query import connect

__all__ = [
    "GALLERY_COLUMNS",
    "MORPH_COLUMNS",
    "ReportData",
    "load_report_data",
    "resolve_slide",
    "slide_name",
]

#: Morphometry columns the gallery cards show.
MORPH_COLUMNS = [
    "cell_diameter_um",
    "cell_area_um2",
    "nucleus_area_um2",
    "nc_ratio",
    "nucleus_circularity",
    "nucleus_lobes",
    "focus_score",
]
#: Columns of a cell in the gallery's JSON blob, in this order (``slide_name`` is derived).
GALLERY_COLUMNS = [
    "cell_id",
    "slide_id",
    "slide_name",
    "cell_index",
    "centroid_x",
    "centroid_y",
    "cell_type",
    "case",
    "caption",
    "caption_logprob",
    "qc_flags",
    "consistent",
    "inconsistent_attributes",
    *MORPH_COLUMNS,
    *ATTRIBUTE_NAMES,
]


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows.

    ``cells`` are sorted by cell type (ontology order, other types, untyped last), then slide URI
    and cell index; each carries the :data:`GALLERY_COLUMNS`, ``slide_uri`` and
    ``thumbnail_jpeg`` (stored bytes or ``None``). ``by_slide`` groups them per slide id in that
    order. ``ok_slides`` maps a slide id to its latest successful processing (``run_id``,
    ``width``/``height`` in level-0 px, ``mpp`` in µm/px, ..., and the whole-smear columns:
    ``zones_selected``, ``zone_areas_mm2`` and ``cells_outside_zones`` as ``[(zone, value)]``,
    ``cells_total``, ``sampled``, ``cells_total_estimated``, ``zone_map_png`` stored bytes; null for slides read whole or
    written before schema version 2). ``failures`` are the slides whose
    latest outcome is a failure, with ``attempts`` (failed rows of that slide).
    """

    location: str
    slide_id: str | None
    runs: list[dict]
    failures: list[dict]
    slides_latest: list[dict]
    ok_slides: dict[str, dict]
    cells: list[dict]
    by_slide: dict[str, list[dict]]
    consistency: dict
    cohort: CohortResult | None


def slide_name(uri: str | None) -> str:
    """The last path segment of a slide URI (``?`` when there is none)."""
    return (uri or "?").rstrip("/").rsplit("/", 1)[-1]


def _show(x: object) -> str:
    """A path or id for a one-line message: control characters (newlines) shown escaped."""
    s = str(x)
    return s if s.isprintable() else ascii(s)


def resolve_slide(con, slide: str) -> str:
    """The one slide id that ``slide`` (an id, unique id prefix or URI) names in the outputs.

    Raises :class:`ConfigError` (one line) when it names none or several.
    """
    hits = con.execute(
        "SELECT DISTINCT slide_id, slide_uri FROM slides "
        "WHERE slide_id = ? OR slide_uri = ? OR starts_with(slide_id, ?)",
        [slide, slide, slide],
    ).fetchall()
    ids = sorted({h[0] for h in hits})
    if not ids:
        raise ConfigError(
            f"--slide {_show(slide)}: no such slide id, id prefix or URI in the outputs"
        )
    if len(ids) > 1:
        raise ConfigError(
            f"--slide {_show(slide)}: ambiguous, matches {len(ids)} slides "
            f"({', '.join(_show(i[:12]) for i in ids[:5])})"
        )
    return ids[0]


def _rows(con, sql: str, params: list) -> list[dict]:
    return con.sql(sql, params=params).to_arrow_table().to_pylist()


def load_report_data(
    outputs: Outputs, *, slide: str | None = None, manifest: str | Path | None = None
) -> ReportData:
    """Run the report's queries over ``outputs``; ``slide`` restricts to one slide (see
    :func:`resolve_slide`), ``manifest`` adds the cohort analysis (:mod:`pipeline.cohort`)."""
    con = connect(outputs)
    slide_id = resolve_slide(con, slide) if slide else None
    # the slide filter is always a bound parameter, never text in the SQL
    where, params = ("WHERE slide_id = ?", [slide_id]) if slide_id else ("", [])
    and_where = where.replace("WHERE", "AND")

    runs = (
        con.sql("SELECT * EXCLUDE (config_json) FROM runs ORDER BY started_at DESC")
        .to_arrow_table()
        .to_pylist()
    )
    # a skip is no outcome: current_slides keeps each slide's latest ok/failed row
    slides_latest = _rows(
        con,
        f"SELECT slide_id, slide_uri, status, reason, finished_at FROM current_slides {where} "
        "ORDER BY slide_uri, slide_id",
        params,
    )
    ok_slides = {
        r["slide_id"]: r
        for r in _rows(
            con,
            f"""
        SELECT slide_id, slide_uri, run_id, width, height, mpp, mpp_source, model_version,
               finished_at, cell_count, zones_selected, zone_areas_mm2, cells_outside_zones,
               cells_total, sampled, cells_total_estimated, zone_map_png
        FROM slides WHERE status = 'ok' {and_where}
        -- one whole row, the latest: a later run read whole leaves no stale zone map behind
        QUALIFY row_number() OVER (
            PARTITION BY slide_id ORDER BY finished_at DESC NULLS LAST, run_id DESC NULLS LAST) = 1""",
            params,
        )
    }
    # the latest outcome per slide, not the last run's rows: a re-run that skipped everything
    # writes none, and a corrupt slide must stay listed until a later ok row supersedes it
    failures = (
        _rows(
            con,
            f"""
        SELECT c.slide_uri, c.reason, c.run_id, c.finished_at,
               (SELECT count(*) FROM slides s WHERE s.slide_id = c.slide_id AND s.status = 'failed') AS attempts
        FROM current_slides c WHERE c.status = 'failed' {and_where.replace("slide_id", "c.slide_id")}
        ORDER BY c.slide_uri, c.slide_id""",
            params,
        )
        if runs
        else []
    )

    cols = ", ".join(f'"{c}"' for c in GALLERY_COLUMNS if c != "slide_name")
    cells = _rows(
        con,
        f"SELECT {cols}, slide_uri, thumbnail_jpeg FROM current_cells {where} ORDER BY slide_uri, cell_index",
        params,
    )
    for c in cells:
        c["slide_name"] = slide_name(c["slide_uri"])
    type_rank = {t: i for i, t in enumerate(CELL_TYPES)}
    cells.sort(
        key=lambda c: (
            type_rank.get(c["cell_type"], len(CELL_TYPES) + (c["cell_type"] is None)),
            c["cell_type"] or "",
            c["slide_uri"],
            c["cell_index"],
        )
    )
    by_slide: dict[str, list[dict]] = {}
    for c in cells:
        by_slide.setdefault(c["slide_id"], []).append(c)
    return ReportData(
        location=outputs.location,
        slide_id=slide_id,
        runs=runs,
        failures=failures,
        slides_latest=slides_latest,
        ok_slides=ok_slides,
        cells=cells,
        by_slide=by_slide,
        consistency=consistency_summary(cells),
        cohort=cohort_analysis(outputs, manifest, allow_unknown=True) if manifest else None,
    )
