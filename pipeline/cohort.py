"""Cohort analysis: differential counts, attribute frequencies and between-cohort comparisons.

Input: the outputs (``current_cells``: each slide's latest successful processing) and a manifest
CSV mapping slides to cohorts::

    slide_id,cohort,patient,age          (or slide_uri instead of / besides slide_id)
    9f2c...,AML,P001,63

Statistics (all proportions are of cells with a cell type; untyped cells are counted apart):

* differential: per cohort and cell type, count / typed cells with a 95% Wilson score interval;
* attributes: per cohort, cell type, attribute and value, count / cells of that type whose
  caption mentions the attribute, with a Wilson interval;
* comparison (cell level): for every pair of cohorts and cell type, the proportion difference with
  Newcombe's hybrid-score 95% interval and Fisher's exact test on the 2x2 table (type vs other
  types, cohort A vs B), Benjamini-Hochberg q-values over all tests of the table. Cells of one
  slide are not independent, so this p-value is optimistic when slides differ a lot;
* comparison (unit level): the same per cell type with patients (or slides when the manifest has
  no patient column) as units: per-unit proportions compared with the Mann-Whitney U test
  (needs >= 2 units per cohort), BH-corrected. This is the test to trust for inference.
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from scipy import stats

from hemblip.ontology import ATTRIBUTE_NAMES, CELL_TYPES
from pipeline.errors import ConfigError
from pipeline.outputs import Outputs, open_outputs
from pipeline.query import connect

__all__ = [
    "CohortResult",
    "read_manifest",
    "cohort_analysis",
    "write_results",
    "wilson_interval",
    "newcombe_interval",
    "benjamini_hochberg",
]

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """95% Wilson score interval of the proportion k/n; ``(None, None)`` when n == 0."""
    if n <= 0:
        return None, None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the bounds at k == 0 and k == n are exactly 0 and 1; say so instead of rounding noise
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def newcombe_interval(k1: int, n1: int, k2: int, n2: int) -> tuple[float | None, float | None]:
    """95% interval of p1 - p2 by Newcombe's hybrid score method (from the two Wilson intervals)."""
    if n1 <= 0 or n2 <= 0:
        return None, None
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1)
    l2, u2 = wilson_interval(k2, n2)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
            d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def benjamini_hochberg(pvalues: list[float | None]) -> list[float | None]:
    """BH-adjusted q-values (same order; ``None`` entries are skipped and stay ``None``)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and not math.isnan(p)]
    out: list[float | None] = [None] * len(pvalues)
    if not idx:
        return out
    p = np.array([pvalues[i] for i in idx], float)
    order = np.argsort(p)
    m = len(p)
    ranked = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    for j, o in enumerate(order):
        out[idx[o]] = float(q[j])
    return out


@dataclass
class CohortResult:
    """Tables of a cohort analysis (Arrow) plus what did not match."""

    differential: pa.Table
    attributes: pa.Table
    comparison: pa.Table
    unit_comparison: pa.Table
    slides: pa.Table  # manifest rows matched to slides, with their cell counts
    unmatched_manifest: list[str] = field(default_factory=list)  # manifest lines with no usable cells
    unlisted_slides: list[str] = field(default_factory=list)  # slides with cells but not in the manifest

    def tables(self) -> dict[str, pa.Table]:
        return {"differential": self.differential, "attributes": self.attributes,
                "comparison": self.comparison, "unit_comparison": self.unit_comparison,
                "slides": self.slides}


def read_manifest(path: str | Path) -> pa.Table:
    """Read and check a cohort manifest CSV; returns columns slide_id, slide_uri, cohort, patient,
    line (1-based CSV line) and every extra column as strings.

    Raises ``ConfigError`` naming the file and line for: a missing ``cohort`` column, neither
    ``slide_id`` nor ``slide_uri``, an empty cohort or slide, a slide listed twice.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = list(reader)
    except OSError as exc:
        raise ConfigError(f"--manifest {path}: cannot read: {exc.strerror or exc}") from exc
    if not header:
        raise ConfigError(f"--manifest {path}: empty file (expected a header with slide_id or slide_uri, and cohort)")
    if "cohort" not in header:
        raise ConfigError(f"--manifest {path}: missing column 'cohort' (columns: {', '.join(header)})")
    if "slide_id" not in header and "slide_uri" not in header:
        raise ConfigError(f"--manifest {path}: needs a 'slide_id' or 'slide_uri' column (columns: {', '.join(header)})")
    if not rows:
        raise ConfigError(f"--manifest {path}: no rows")
    seen: dict[str, int] = {}
    cols: dict[str, list] = {h: [] for h in header}
    cols.setdefault("slide_id", [])
    cols.setdefault("slide_uri", [])
    cols.setdefault("patient", [])
    lines = []
    for lineno, row in enumerate(rows, start=2):
        row = {k: (v or "").strip() if isinstance(v, str) or v is None else v for k, v in row.items() if k is not None}
        key = row.get("slide_id") or row.get("slide_uri")
        if not key:
            raise ConfigError(f"--manifest {path}:{lineno}: empty slide_id/slide_uri")
        if not row.get("cohort"):
            raise ConfigError(f"--manifest {path}:{lineno}: empty cohort for slide {key}")
        if key in seen:
            raise ConfigError(f"--manifest {path}:{lineno}: slide {key} already listed on line {seen[key]}")
        seen[key] = lineno
        for h in cols:
            cols[h].append(row.get(h) or None)
        lines.append(lineno)
    cols["line"] = lines
    return pa.table({k: pa.array(v, pa.int64() if k == "line" else pa.string()) for k, v in cols.items()})


_DIFF_SQL = """
SELECT m.cohort, c.cell_type, count(*) AS k
FROM current_cells c JOIN matched m ON c.slide_id = m.slide_id
{where} GROUP BY ALL
"""


def cohort_analysis(outputs: Outputs | str, manifest: str | Path | pa.Table, *,
                    s3_endpoint: str | None = None, exclude_flagged: bool = False,
                    allow_unknown: bool = False) -> CohortResult:
    """Run the analysis described in the module docstring.

    ``exclude_flagged`` drops cells with any QC flag. Manifest slides that are not in the outputs
    at all raise ``ConfigError`` (listing them) unless ``allow_unknown``; slides that are known but
    have no successfully processed cells are reported in ``unmatched_manifest``.
    """
    if not isinstance(outputs, Outputs):
        outputs = open_outputs(outputs, s3_endpoint=s3_endpoint)
    src = manifest if isinstance(manifest, pa.Table) else read_manifest(manifest)
    name = "manifest" if isinstance(manifest, pa.Table) else str(manifest)
    con = connect(outputs, extra={"manifest": src})
    known = con.sql("""
        SELECT m.line, m.slide_id AS m_id, m.slide_uri AS m_uri,
               s.slide_id, any_value(s.slide_uri) AS slide_uri,
               bool_or(s.status = 'ok') AS ok, arg_max(s.status, s.finished_at) AS last_status,
               arg_max(s.reason, s.finished_at) AS last_reason
        FROM manifest m LEFT JOIN slides s
          ON (m.slide_id IS NOT NULL AND s.slide_id = m.slide_id)
          OR (m.slide_id IS NULL AND s.slide_uri = m.slide_uri)
        GROUP BY ALL ORDER BY m.line""").fetchall()
    unknown = [f"line {ln}: {mid or muri}" for ln, mid, muri, sid, *_ in known if sid is None]
    if unknown and not allow_unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ConfigError(f"--manifest {name}: {len(unknown)} slide(s) not found in the outputs: "
                          f"{'; '.join(unknown[:5])}{more}")
    unmatched = [f"line {ln}: {mid or muri}: not found in the outputs" for ln, mid, muri, sid, *_ in known if sid is None]
    unmatched += [f"line {ln}: {mid or muri}: no successfully processed cells (last status {st}: {rs})"
                  for ln, mid, muri, sid, _u, ok, st, rs in known if sid is not None and not ok]
    pairs = pa.table({
        "line": pa.array([r[0] for r in known if r[3] is not None], pa.int64()),
        "resolved_slide_id": pa.array([r[3] for r in known if r[3] is not None], pa.string()),
    })
    con.register("resolved", pairs)  # an in-memory Arrow table: no file access needed
    extra_cols = [c for c in src.column_names if c not in ("slide_id", "line")]
    con.execute(f"""CREATE VIEW matched AS SELECT r.resolved_slide_id AS slide_id,
        {', '.join('m."' + c.replace('"', '""') + '"' for c in extra_cols)}
        FROM manifest m JOIN resolved r ON m.line = r.line""")
    where = "WHERE len(c.qc_flags) = 0" if exclude_flagged else ""

    slides = con.sql(f"""
        SELECT m.*, coalesce(n.cells, 0) AS cells, coalesce(n.typed, 0) AS typed_cells
        FROM matched m LEFT JOIN (
            SELECT slide_id, count(*) AS cells, count(cell_type) AS typed
            FROM current_cells c {where} GROUP BY slide_id) n USING (slide_id)
        ORDER BY cohort, slide_id""").to_arrow_table()
    unlisted = [r[0] for r in con.sql(
        "SELECT DISTINCT slide_id FROM current_cells WHERE slide_id NOT IN (SELECT slide_id FROM matched) ORDER BY 1"
    ).fetchall()]

    counts: dict[str, dict[str | None, int]] = {}
    for cohort, cell_type, k in con.sql(_DIFF_SQL.format(where=where)).fetchall():
        counts.setdefault(cohort, {})[cell_type] = k
    cohorts = sorted(set(slides.column("cohort").to_pylist()))
    present = {t for c in counts.values() for t in c if t is not None}
    types = [t for t in CELL_TYPES if t in present] + sorted(present - set(CELL_TYPES))
    meta: dict[str, dict[str, int]] = {}
    for r in slides.to_pylist():  # only slides that contributed cells count
        if r["cells"]:
            m = meta.setdefault(r["cohort"], {"slides": 0, "patients": set()})
            m["slides"] += 1
            if r.get("patient"):
                m["patients"].add(r["patient"])
    meta = {k: {"slides": v["slides"], "patients": len(v["patients"])} for k, v in meta.items()}

    diff_rows = []
    for cohort in cohorts:
        c = counts.get(cohort, {})
        n = sum(v for t, v in c.items() if t is not None)
        for t in types:
            k = c.get(t, 0)
            lo, hi = wilson_interval(k, n)
            diff_rows.append({"cohort": cohort, "cell_type": t, "count": k, "typed_cells": n,
                              "untyped_cells": c.get(None, 0), "slides": meta.get(cohort, {}).get("slides", 0),
                              "patients": meta.get(cohort, {}).get("patients", 0),
                              "proportion": k / n if n else None, "ci_low": lo, "ci_high": hi})
    differential = pa.Table.from_pylist(diff_rows, schema=pa.schema([
        ("cohort", pa.string()), ("cell_type", pa.string()), ("count", pa.int64()), ("typed_cells", pa.int64()),
        ("untyped_cells", pa.int64()), ("slides", pa.int64()), ("patients", pa.int64()),
        ("proportion", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64())]))

    attr_cols = ", ".join(f'"{a}"' for a in ATTRIBUTE_NAMES)
    attr_rows = con.sql(f"""
        WITH typed AS (
            SELECT m.cohort, c.cell_type, {', '.join('c."' + a + '"' for a in ATTRIBUTE_NAMES)}
            FROM current_cells c JOIN matched m ON c.slide_id = m.slide_id
            {where.replace('WHERE', 'WHERE c.cell_type IS NOT NULL AND') if where else 'WHERE c.cell_type IS NOT NULL'}
        ), long AS (UNPIVOT typed ON {attr_cols} INTO NAME attribute VALUE value)
        , grouped AS (SELECT cohort, cell_type, attribute, value, count(*) AS count
                      FROM long GROUP BY cohort, cell_type, attribute, value)
        SELECT *, sum(count) OVER (PARTITION BY cohort, cell_type, attribute) AS mentioned
        FROM grouped ORDER BY cohort, cell_type, attribute, value""").fetchall()
    attributes = pa.Table.from_pylist([
        {"cohort": co, "cell_type": t, "attribute": a, "value": v, "count": k, "mentioned": int(n),
         "frequency": k / n, "ci_low": wilson_interval(k, int(n))[0], "ci_high": wilson_interval(k, int(n))[1]}
        for co, t, a, v, k, n in attr_rows], schema=pa.schema([
            ("cohort", pa.string()), ("cell_type", pa.string()), ("attribute", pa.string()), ("value", pa.string()),
            ("count", pa.int64()), ("mentioned", pa.int64()), ("frequency", pa.float64()),
            ("ci_low", pa.float64()), ("ci_high", pa.float64())]))

    comp_rows = []
    for a, b in itertools.combinations(cohorts, 2):
        na = sum(v for t, v in counts.get(a, {}).items() if t is not None)
        nb = sum(v for t, v in counts.get(b, {}).items() if t is not None)
        for t in types:
            ka, kb = counts.get(a, {}).get(t, 0), counts.get(b, {}).get(t, 0)
            p = float(stats.fisher_exact([[ka, na - ka], [kb, nb - kb]])[1]) if na and nb else None
            lo, hi = newcombe_interval(ka, na, kb, nb)
            comp_rows.append({"cohort_a": a, "cohort_b": b, "cell_type": t, "count_a": ka, "typed_a": na,
                              "count_b": kb, "typed_b": nb, "proportion_a": ka / na if na else None,
                              "proportion_b": kb / nb if nb else None,
                              "difference": (ka / na - kb / nb) if na and nb else None,
                              "diff_ci_low": lo, "diff_ci_high": hi, "test": "fisher_exact", "p_value": p})
    for r, q in zip(comp_rows, benjamini_hochberg([r["p_value"] for r in comp_rows])):
        r["q_value"] = q
    comparison = pa.Table.from_pylist(comp_rows, schema=pa.schema([
        ("cohort_a", pa.string()), ("cohort_b", pa.string()), ("cell_type", pa.string()),
        ("count_a", pa.int64()), ("typed_a", pa.int64()), ("count_b", pa.int64()), ("typed_b", pa.int64()),
        ("proportion_a", pa.float64()), ("proportion_b", pa.float64()), ("difference", pa.float64()),
        ("diff_ci_low", pa.float64()), ("diff_ci_high", pa.float64()), ("test", pa.string()),
        ("p_value", pa.float64()), ("q_value", pa.float64())]))

    # unit level: patients when the manifest names them, else slides
    unit = "coalesce(m.patient, m.slide_id)"
    unit_counts: dict[tuple[str, str], dict[str, int]] = {}
    for cohort, u, t, k in con.sql(f"""
            SELECT m.cohort, {unit} AS unit, c.cell_type, count(*) FROM current_cells c
            JOIN matched m ON c.slide_id = m.slide_id
            {where.replace('WHERE', 'WHERE c.cell_type IS NOT NULL AND') if where else 'WHERE c.cell_type IS NOT NULL'}
            GROUP BY ALL""").fetchall():
        unit_counts.setdefault((cohort, u), {})[t] = k
    props: dict[str, dict[str, list[float]]] = {}
    for (cohort, _u), c in unit_counts.items():
        n = sum(c.values())
        for t in types:
            props.setdefault(cohort, {}).setdefault(t, []).append(c.get(t, 0) / n)
    unit_rows = []
    for a, b in itertools.combinations(cohorts, 2):
        for t in types:
            xa, xb = props.get(a, {}).get(t, []), props.get(b, {}).get(t, [])
            p = None
            if len(xa) >= 2 and len(xb) >= 2 and (np.ptp(xa + xb) > 0):
                p = float(stats.mannwhitneyu(xa, xb, alternative="two-sided").pvalue)
            unit_rows.append({"cohort_a": a, "cohort_b": b, "cell_type": t, "units_a": len(xa), "units_b": len(xb),
                              "median_a": float(np.median(xa)) if xa else None,
                              "median_b": float(np.median(xb)) if xb else None,
                              "test": "mann_whitney_u", "p_value": p})
    for r, q in zip(unit_rows, benjamini_hochberg([r["p_value"] for r in unit_rows])):
        r["q_value"] = q
    unit_comparison = pa.Table.from_pylist(unit_rows, schema=pa.schema([
        ("cohort_a", pa.string()), ("cohort_b", pa.string()), ("cell_type", pa.string()),
        ("units_a", pa.int64()), ("units_b", pa.int64()), ("median_a", pa.float64()), ("median_b", pa.float64()),
        ("test", pa.string()), ("p_value", pa.float64()), ("q_value", pa.float64())]))
    return CohortResult(differential=differential, attributes=attributes, comparison=comparison,
                        unit_comparison=unit_comparison, slides=slides,
                        unmatched_manifest=unmatched, unlisted_slides=unlisted)


def write_results(result: CohortResult, out_dir: str | Path) -> list[Path]:
    """Write every table as ``<name>.parquet`` and ``<name>.csv`` (plus ``unmatched.csv``) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in result.tables().items():
        pq.write_table(table, out / f"{name}.parquet")
        pacsv.write_csv(table, out / f"{name}.csv")
        written += [out / f"{name}.parquet", out / f"{name}.csv"]
    with open(out / "unmatched.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["kind", "detail"])
        w.writerows([("manifest", m) for m in result.unmatched_manifest])
        w.writerows([("slide_not_in_manifest", s) for s in result.unlisted_slides])
    written.append(out / "unmatched.csv")
    return written
