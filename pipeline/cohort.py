"""Cohort analysis: differential counts, attribute frequencies and between-cohort comparisons.

Input: the outputs (``current_cells``: each slide's latest successful processing) and a manifest
CSV mapping slides to cohorts::

    slide_id,cohort,patient,age          (or slide_uri instead of / besides slide_id)
    9f2c...,AML,P001,63

The unit of inference is the patient (the slide when the manifest has no ``patient`` column):
cells of one patient are not independent samples, so only a comparison between patients can say
that cohorts differ. Statistics (proportions are of cells with a cell type; untyped cells are
counted apart):

* units: per cohort, patient and cell type, count / typed cells of that patient;
* unit_comparison (the comparison to report): for every pair of cohorts and cell type, the
  per-patient proportions compared with a two-sided Mann-Whitney U test (exact permutation
  distribution, ties allowed, when there are at most ``EXACT_MAX_ARRANGEMENTS`` ways to split the
  patients; else the normal approximation), Benjamini-Hochberg q-values over all tests. A pair is
  tested only when each cohort has at least ``MIN_UNITS_PER_COHORT`` patients and the smallest
  p-value the exact test can reach with that many (:func:`min_attainable_p`) is <= ``ALPHA``;
  otherwise ``p_value`` is null and ``note`` says why (1 vs 2 patients can never give p < 0.667);
* differential: per cohort and cell type, count / typed cells with a 95% Wilson score interval,
  cells pooled per cohort (descriptive);
* attributes: per cohort, cell type, attribute and value, count / cells of that type whose
  caption mentions the attribute, with a Wilson interval (cells pooled, descriptive);
* comparison (cells pooled per group, not independent samples: descriptive only): the proportion
  difference with Newcombe's hybrid-score 95% interval and Fisher's exact test on the pooled 2x2
  table, BH q-values. Its p-values treat every cell as an independent sample and overstate the
  evidence; never read them as a cohort difference.

:func:`summarize` gives the headline (patient level, or a plain statement that the cohorts are too
small for any test) that the CLI, ``summary.json`` and the HTML report lead with.
"""

from __future__ import annotations

import csv
import itertools
import json
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
    "ALPHA",
    "MIN_UNITS_PER_COHORT",
    "EXACT_MAX_ARRANGEMENTS",
    "POOLED_SCOPE",
    "CohortResult",
    "read_manifest",
    "cohort_analysis",
    "summarize",
    "write_results",
    "wilson_interval",
    "newcombe_interval",
    "benjamini_hochberg",
    "min_attainable_p",
]

#: Significance level of the headline (BH q-values below it count as differences).
ALPHA = 0.05
#: Fewest patients (units) per cohort for a between-cohort test to be run at all.
MIN_UNITS_PER_COHORT = 3
#: Up to this many ways to split the units between the two cohorts the Mann-Whitney p-value comes
#: from the exact permutation distribution (handles ties); above it, the normal approximation.
EXACT_MAX_ARRANGEMENTS = 50_000
#: The label every cell-level (pooled) figure carries wherever it is shown.
POOLED_SCOPE = "cells pooled per group, not independent samples: descriptive only"


def wilson_interval(k: int, n: int) -> tuple[float | None, float | None]:
    """95% Wilson score interval of the proportion k/n (scipy); ``(None, None)`` when n == 0."""
    if n <= 0:
        return None, None
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def newcombe_interval(k1: int, n1: int, k2: int, n2: int) -> tuple[float | None, float | None]:
    """95% interval of p1 - p2 by Newcombe's hybrid score method (from the two Wilson intervals)."""
    if n1 <= 0 or n2 <= 0:
        return None, None
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1)
    l2, u2 = wilson_interval(k2, n2)
    d = p1 - p2
    return (
        d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
        d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2),
    )


def benjamini_hochberg(pvalues: list[float | None]) -> list[float | None]:
    """BH-adjusted q-values (scipy ``false_discovery_control``), same order; ``None``/NaN entries
    are left out of the family and stay ``None``."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and not math.isnan(p)]
    out: list[float | None] = [None] * len(pvalues)
    if idx:
        q = stats.false_discovery_control(np.array([pvalues[i] for i in idx], float), method="bh")
        for i, v in zip(idx, q):
            out[i] = float(v)
    return out


def min_attainable_p(n1: int, n2: int) -> float | None:
    """Smallest two-sided p-value an exact Mann-Whitney U test can give with n1 vs n2 units.

    Reached when every unit of one cohort lies above every unit of the other: each of the two
    extreme orderings has probability 1 / C(n1+n2, n1) under the null, so p = 2 / C(n1+n2, n1)
    (capped at 1); ties can only make the smallest p larger. ``None`` when a cohort is empty.
    E.g. 1 vs 2: 0.667, 3 vs 3: 0.1, 4 vs 4: 0.029.
    """
    if n1 < 1 or n2 < 1:
        return None
    return min(1.0, 2 / math.comb(n1 + n2, n1))


def _testable(n1: int, n2: int, alpha: float = ALPHA) -> bool:
    p = min_attainable_p(n1, n2)
    return min(n1, n2) >= MIN_UNITS_PER_COHORT and p is not None and p <= alpha


def _units_needed(alpha: float = ALPHA) -> int:
    """Smallest n for which n vs n units can be tested at ``alpha``."""
    n = MIN_UNITS_PER_COHORT
    while not _testable(n, n, alpha):
        n += 1
    return n


def _mann_whitney(xa: list[float], xb: list[float]) -> tuple[float, str]:
    """Two-sided Mann-Whitney U p-value and how it was computed."""
    if np.ptp(xa + xb) == 0:  # every unit has the same proportion: nothing to rank
        return 1.0, "exact"
    if math.comb(len(xa) + len(xb), len(xa)) <= EXACT_MAX_ARRANGEMENTS:
        # scipy's "exact" method refuses ties and "auto" then falls back to the normal
        # approximation, which undercuts the exact minimum on small cohorts (4 vs 4 with tied
        # zeros: 0.013 instead of 0.029); the full permutation distribution handles ties exactly
        res = stats.mannwhitneyu(
            xa, xb, alternative="two-sided", method=stats.PermutationMethod(n_resamples=np.inf)
        )
        return float(res.pvalue), "exact"
    return float(
        stats.mannwhitneyu(xa, xb, alternative="two-sided", method="asymptotic").pvalue
    ), "asymptotic"


@dataclass
class CohortResult:
    """Tables of a cohort analysis (Arrow) plus what did not match."""

    differential: pa.Table
    attributes: pa.Table
    comparison: pa.Table  # cell level, pooled: descriptive only (POOLED_SCOPE)
    unit_comparison: pa.Table  # patient level: the comparison to report
    slides: pa.Table  # manifest rows matched to slides, with their cell counts
    units: pa.Table = field(default_factory=lambda: pa.table({}))  # per-patient proportions
    unit: str = "patient"  # what a unit is: "patient", "slide" or "patient or slide"
    unmatched_manifest: list[str] = field(
        default_factory=list
    )  # manifest lines with no usable cells
    unlisted_slides: list[str] = field(
        default_factory=list
    )  # slides with cells but not in the manifest

    def tables(self) -> dict[str, pa.Table]:
        return {
            "differential": self.differential,
            "attributes": self.attributes,
            "comparison": self.comparison,
            "unit_comparison": self.unit_comparison,
            "units": self.units,
            "slides": self.slides,
        }


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
        raise ConfigError(
            f"--manifest {path}: empty file (expected a header with slide_id or slide_uri, and cohort)"
        )
    if "cohort" not in header:
        raise ConfigError(
            f"--manifest {path}: missing column 'cohort' (columns: {', '.join(header)})"
        )
    if "slide_id" not in header and "slide_uri" not in header:
        raise ConfigError(
            f"--manifest {path}: needs a 'slide_id' or 'slide_uri' column (columns: {', '.join(header)})"
        )
    if not rows:
        raise ConfigError(f"--manifest {path}: no rows")
    seen: dict[str, int] = {}
    cols: dict[str, list] = {h: [] for h in header}
    cols.setdefault("slide_id", [])
    cols.setdefault("slide_uri", [])
    cols.setdefault("patient", [])
    lines = []
    for lineno, row in enumerate(rows, start=2):
        row = {
            k: (v or "").strip() if isinstance(v, str) or v is None else v
            for k, v in row.items()
            if k is not None
        }
        key = row.get("slide_id") or row.get("slide_uri")
        if not key:
            raise ConfigError(f"--manifest {path}:{lineno}: empty slide_id/slide_uri")
        if not row.get("cohort"):
            raise ConfigError(f"--manifest {path}:{lineno}: empty cohort for slide {key}")
        if key in seen:
            raise ConfigError(
                f"--manifest {path}:{lineno}: slide {key} already listed on line {seen[key]}"
            )
        seen[key] = lineno
        for h in cols:
            cols[h].append(row.get(h) or None)
        lines.append(lineno)
    cols["line"] = lines
    return pa.table(
        {k: pa.array(v, pa.int64() if k == "line" else pa.string()) for k, v in cols.items()}
    )


_DIFF_SQL = """
SELECT m.cohort, c.cell_type, count(*) AS k
FROM current_cells c JOIN matched m ON c.slide_id = m.slide_id
{where} GROUP BY ALL
"""


def cohort_analysis(
    outputs: Outputs | str,
    manifest: str | Path | pa.Table,
    *,
    s3_endpoint: str | None = None,
    exclude_flagged: bool = False,
    allow_unknown: bool = False,
    storage_options=None,
) -> CohortResult:
    """Run the analysis described in the module docstring.

    ``exclude_flagged`` drops cells with any QC flag. Manifest slides that are not in the outputs
    at all raise ``ConfigError`` (listing them) unless ``allow_unknown``; slides that are known but
    have no successfully processed cells are reported in ``unmatched_manifest``.
    ``s3_endpoint``/``storage_options``: how to reach S3 (:func:`pipeline.outputs.open_outputs`).
    """
    if not isinstance(outputs, Outputs):
        outputs = open_outputs(outputs, s3_endpoint=s3_endpoint, storage_options=storage_options)
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
        raise ConfigError(
            f"--manifest {name}: {len(unknown)} slide(s) not found in the outputs: "
            f"{'; '.join(unknown[:5])}{more}"
        )
    unmatched = [
        f"line {ln}: {mid or muri}: not found in the outputs"
        for ln, mid, muri, sid, *_ in known
        if sid is None
    ]
    unmatched += [
        f"line {ln}: {mid or muri}: no successfully processed cells (last status {st}: {rs})"
        for ln, mid, muri, sid, _u, ok, st, rs in known
        if sid is not None and not ok
    ]
    pairs = pa.table(
        {
            "line": pa.array([r[0] for r in known if r[3] is not None], pa.int64()),
            "resolved_slide_id": pa.array([r[3] for r in known if r[3] is not None], pa.string()),
        }
    )
    con.register("resolved", pairs)  # an in-memory Arrow table: no file access needed
    extra_cols = [c for c in src.column_names if c not in ("slide_id", "line")]
    con.execute(f"""CREATE VIEW matched AS SELECT r.resolved_slide_id AS slide_id,
        {", ".join('m."' + c.replace('"', '""') + '"' for c in extra_cols)}
        FROM manifest m JOIN resolved r ON m.line = r.line""")
    where = "WHERE len(c.qc_flags) = 0" if exclude_flagged else ""

    slides = con.sql(f"""
        SELECT m.*, coalesce(n.cells, 0) AS cells, coalesce(n.typed, 0) AS typed_cells
        FROM matched m LEFT JOIN (
            SELECT slide_id, count(*) AS cells, count(cell_type) AS typed
            FROM current_cells c {where} GROUP BY slide_id) n USING (slide_id)
        ORDER BY cohort, slide_id""").to_arrow_table()
    unlisted = [
        r[0]
        for r in con.sql(
            "SELECT DISTINCT slide_id FROM current_cells WHERE slide_id NOT IN (SELECT slide_id FROM matched) ORDER BY 1"
        ).fetchall()
    ]

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
            diff_rows.append(
                {
                    "cohort": cohort,
                    "cell_type": t,
                    "count": k,
                    "typed_cells": n,
                    "untyped_cells": c.get(None, 0),
                    "slides": meta.get(cohort, {}).get("slides", 0),
                    "patients": meta.get(cohort, {}).get("patients", 0),
                    "proportion": k / n if n else None,
                    "ci_low": lo,
                    "ci_high": hi,
                }
            )
    differential = pa.Table.from_pylist(
        diff_rows,
        schema=pa.schema(
            [
                ("cohort", pa.string()),
                ("cell_type", pa.string()),
                ("count", pa.int64()),
                ("typed_cells", pa.int64()),
                ("untyped_cells", pa.int64()),
                ("slides", pa.int64()),
                ("patients", pa.int64()),
                ("proportion", pa.float64()),
                ("ci_low", pa.float64()),
                ("ci_high", pa.float64()),
            ]
        ),
    )

    attr_cols = ", ".join(f'"{a}"' for a in ATTRIBUTE_NAMES)
    attr_rows = con.sql(f"""
        WITH typed AS (
            SELECT m.cohort, c.cell_type, {", ".join('c."' + a + '"' for a in ATTRIBUTE_NAMES)}
            FROM current_cells c JOIN matched m ON c.slide_id = m.slide_id
            {where.replace("WHERE", "WHERE c.cell_type IS NOT NULL AND") if where else "WHERE c.cell_type IS NOT NULL"}
        ), long AS (UNPIVOT typed ON {attr_cols} INTO NAME attribute VALUE value)
        , grouped AS (SELECT cohort, cell_type, attribute, value, count(*) AS count
                      FROM long GROUP BY cohort, cell_type, attribute, value)
        SELECT *, sum(count) OVER (PARTITION BY cohort, cell_type, attribute) AS mentioned
        FROM grouped ORDER BY cohort, cell_type, attribute, value""").fetchall()
    attributes = pa.Table.from_pylist(
        [
            {
                "cohort": co,
                "cell_type": t,
                "attribute": a,
                "value": v,
                "count": k,
                "mentioned": int(n),
                "frequency": k / n,
                "ci_low": wilson_interval(k, int(n))[0],
                "ci_high": wilson_interval(k, int(n))[1],
            }
            for co, t, a, v, k, n in attr_rows
        ],
        schema=pa.schema(
            [
                ("cohort", pa.string()),
                ("cell_type", pa.string()),
                ("attribute", pa.string()),
                ("value", pa.string()),
                ("count", pa.int64()),
                ("mentioned", pa.int64()),
                ("frequency", pa.float64()),
                ("ci_low", pa.float64()),
                ("ci_high", pa.float64()),
            ]
        ),
    )

    comp_rows = []
    for a, b in itertools.combinations(cohorts, 2):
        na = sum(v for t, v in counts.get(a, {}).items() if t is not None)
        nb = sum(v for t, v in counts.get(b, {}).items() if t is not None)
        for t in types:
            ka, kb = counts.get(a, {}).get(t, 0), counts.get(b, {}).get(t, 0)
            p = float(stats.fisher_exact([[ka, na - ka], [kb, nb - kb]])[1]) if na and nb else None
            lo, hi = newcombe_interval(ka, na, kb, nb)
            comp_rows.append(
                {
                    "cohort_a": a,
                    "cohort_b": b,
                    "cell_type": t,
                    "count_a": ka,
                    "typed_a": na,
                    "count_b": kb,
                    "typed_b": nb,
                    "proportion_a": ka / na if na else None,
                    "proportion_b": kb / nb if nb else None,
                    "difference": (ka / na - kb / nb) if na and nb else None,
                    "diff_ci_low": lo,
                    "diff_ci_high": hi,
                    "test": "fisher_exact",
                    "p_value": p,
                    "scope": POOLED_SCOPE,
                }
            )
    for r, q in zip(comp_rows, benjamini_hochberg([r["p_value"] for r in comp_rows])):
        r["q_value"] = q
    comparison = pa.Table.from_pylist(
        comp_rows,
        schema=pa.schema(
            [
                ("cohort_a", pa.string()),
                ("cohort_b", pa.string()),
                ("cell_type", pa.string()),
                ("count_a", pa.int64()),
                ("typed_a", pa.int64()),
                ("count_b", pa.int64()),
                ("typed_b", pa.int64()),
                ("proportion_a", pa.float64()),
                ("proportion_b", pa.float64()),
                ("difference", pa.float64()),
                ("diff_ci_low", pa.float64()),
                ("diff_ci_high", pa.float64()),
                ("test", pa.string()),
                ("p_value", pa.float64()),
                ("scope", pa.string()),
                ("q_value", pa.float64()),
            ]
        ),
    )

    # unit level: patients when the manifest names them, else slides
    has_patient = "patient" in src.column_names
    unit_expr = "coalesce(m.patient, m.slide_id)" if has_patient else "m.slide_id"
    contributing = [r for r in slides.to_pylist() if r["typed_cells"]]
    named = sum(1 for r in contributing if r.get("patient"))
    unit = (
        "patient"
        if contributing and named == len(contributing)
        else "slide"
        if not named
        else "patient or slide"
    )
    unit_counts: dict[tuple[str, str], dict[str, int]] = {}
    for cohort, u, t, k in con.sql(f"""
            SELECT m.cohort, {unit_expr} AS unit, c.cell_type, count(*) FROM current_cells c
            JOIN matched m ON c.slide_id = m.slide_id
            {where.replace("WHERE", "WHERE c.cell_type IS NOT NULL AND") if where else "WHERE c.cell_type IS NOT NULL"}
            GROUP BY ALL""").fetchall():
        unit_counts.setdefault((cohort, u), {})[t] = k
    props: dict[str, dict[str, list[float]]] = {}
    unit_rows = []
    for (cohort, u), c in sorted(unit_counts.items()):
        n = sum(c.values())
        for t in types:
            props.setdefault(cohort, {}).setdefault(t, []).append(c.get(t, 0) / n)
            unit_rows.append(
                {
                    "cohort": cohort,
                    "unit": u,
                    "cell_type": t,
                    "count": c.get(t, 0),
                    "typed_cells": n,
                    "proportion": c.get(t, 0) / n,
                }
            )
    units = pa.Table.from_pylist(
        unit_rows,
        schema=pa.schema(
            [
                ("cohort", pa.string()),
                ("unit", pa.string()),
                ("cell_type", pa.string()),
                ("count", pa.int64()),
                ("typed_cells", pa.int64()),
                ("proportion", pa.float64()),
            ]
        ),
    )
    uc_rows = []
    for a, b in itertools.combinations(cohorts, 2):
        na, nb = (
            sum(1 for co, _ in unit_counts if co == a),
            sum(1 for co, _ in unit_counts if co == b),
        )
        testable = _testable(na, nb)
        note = None if testable else _too_small(a, na, b, nb, unit)
        for t in types:
            xa, xb = props.get(a, {}).get(t, []), props.get(b, {}).get(t, [])
            p, method = _mann_whitney(xa, xb) if testable else (None, None)
            uc_rows.append(
                {
                    "cohort_a": a,
                    "cohort_b": b,
                    "cell_type": t,
                    "unit": unit,
                    "units_a": na,
                    "units_b": nb,
                    "median_a": float(np.median(xa)) if xa else None,
                    "median_b": float(np.median(xb)) if xb else None,
                    "test": "mann_whitney_u",
                    "method": method,
                    "min_attainable_p": min_attainable_p(na, nb),
                    "testable": testable,
                    "p_value": p,
                    "note": note,
                }
            )
    for r, q in zip(uc_rows, benjamini_hochberg([r["p_value"] for r in uc_rows])):
        r["q_value"] = q
    unit_comparison = pa.Table.from_pylist(
        uc_rows,
        schema=pa.schema(
            [
                ("cohort_a", pa.string()),
                ("cohort_b", pa.string()),
                ("cell_type", pa.string()),
                ("unit", pa.string()),
                ("units_a", pa.int64()),
                ("units_b", pa.int64()),
                ("median_a", pa.float64()),
                ("median_b", pa.float64()),
                ("test", pa.string()),
                ("method", pa.string()),
                ("min_attainable_p", pa.float64()),
                ("testable", pa.bool_()),
                ("p_value", pa.float64()),
                ("q_value", pa.float64()),
                ("note", pa.string()),
            ]
        ),
    )
    return CohortResult(
        differential=differential,
        attributes=attributes,
        comparison=comparison,
        unit_comparison=unit_comparison,
        slides=slides,
        units=units,
        unit=unit,
        unmatched_manifest=unmatched,
        unlisted_slides=unlisted,
    )


def _plural(unit: str) -> str:
    return {"patient": "patients", "slide": "slides"}.get(
        unit, "patients (or slides where no patient is named)"
    )


def _too_small(a: str, na: int, b: str, nb: int, unit: str, alpha: float = ALPHA) -> str:
    """One sentence: why cohorts ``a`` and ``b`` (``na``, ``nb`` units) cannot be tested."""
    if not na or not nb:
        return f"too few {_plural(unit)}: {a} {na} vs {b} {nb}; a cohort without typed cells cannot be compared"
    n = _units_needed(alpha)
    return (
        f"too few {_plural(unit)}: {a} {na} vs {b} {nb}; with {na} vs {nb} an exact two-sided Mann–Whitney U "
        f"test cannot give p below {min_attainable_p(na, nb):.3g}, and a test needs at least "
        f"{MIN_UNITS_PER_COHORT} {_plural(unit)} per cohort and a smallest attainable p <= {alpha:g} "
        f"(e.g. {n} vs {n}: {min_attainable_p(n, n):.2g})"
    )


def summarize(result: CohortResult, alpha: float = ALPHA) -> dict:
    """The headline and its evidence as a JSON-able dict (``summary.json``, CLI, report).

    Keys: ``headline`` (one line: the patient-level result, or that no test is possible and why),
    ``unit``, ``alpha``, ``tests_possible``, ``cohorts`` (units, slides, typed cells each),
    ``pairs`` (units per cohort, smallest attainable p, testable, reason), ``significant``
    (patient-level rows with BH q < alpha), ``cell_level`` (the pooled test's scope label).
    """
    unit, plural = result.unit, _plural(result.unit)
    d = result.differential.to_pylist()
    uc = result.unit_comparison.to_pylist()
    per_unit = result.units.to_pylist() if result.units.num_columns else []
    cohorts = {}
    for r in d:
        cohorts.setdefault(
            r["cohort"],
            {
                "units": len({u["unit"] for u in per_unit if u["cohort"] == r["cohort"]}),
                "slides": r["slides"],
                "typed_cells": r["typed_cells"],
            },
        )
    pairs: dict[tuple[str, str], dict] = {}
    for r in uc:
        pairs.setdefault(
            (r["cohort_a"], r["cohort_b"]),
            {
                "cohort_a": r["cohort_a"],
                "cohort_b": r["cohort_b"],
                "units_a": r["units_a"],
                "units_b": r["units_b"],
                "min_attainable_p": r["min_attainable_p"],
                "testable": bool(r["testable"]),
                "reason": r["note"],
            },
        )
    tested = [r for r in uc if r["p_value"] is not None]
    significant = [
        {
            k: r[k]
            for k in (
                "cohort_a",
                "cohort_b",
                "cell_type",
                "median_a",
                "median_b",
                "p_value",
                "q_value",
            )
        }
        for r in tested
        if r["q_value"] is not None and r["q_value"] < alpha
    ]
    untestable = [p for p in pairs.values() if not p["testable"]]
    if len(cohorts) < 2:
        headline = f"One cohort only ({', '.join(cohorts) or 'none with typed cells'}): nothing to compare."
    elif not tested and len(untestable) == 1:
        headline = f"No between-cohort test is possible: {untestable[0]['reason']}. Per-{unit} proportions are descriptive only."
    elif not tested:
        headline = (
            "No between-cohort test is possible in any pair of cohorts: "
            + "; ".join(p["reason"] for p in untestable)
            + f". Per-{unit} proportions are descriptive only."
        )
    else:
        headline = (
            f"{len(significant)} of {len(tested)} cell-type comparisons differ between cohorts at BH q < {alpha:g} "
            f"({unit}-level two-sided Mann–Whitney U on per-{unit} proportions of typed cells)"
        )
        if significant:
            headline += ": " + ", ".join(
                f"{r['cell_type']} ({r['cohort_a']} vs {r['cohort_b']}, median {100 * r['median_a']:.1f}% vs "
                f"{100 * r['median_b']:.1f}%, q {r['q_value']:.2g})"
                for r in significant[:5]
            )
            if len(significant) > 5:
                headline += f" and {len(significant) - 5} more"
        if untestable:
            headline += "; not tested, " + "; ".join(
                f"{p['cohort_a']} vs {p['cohort_b']}: {p['reason']}" for p in untestable
            )
        headline += "."
    return {
        "headline": headline,
        "unit": unit,
        "alpha": alpha,
        "min_units_per_cohort": MIN_UNITS_PER_COHORT,
        "tests_possible": bool(tested),
        "cohorts": cohorts,
        "pairs": list(pairs.values()),
        "significant": significant,
        "patient_level": {
            "table": "unit_comparison",
            "per_unit_table": "units",
            "unit": unit,
            "test": (
                f"two-sided Mann–Whitney U on per-{unit} proportions of typed cells; exact permutation "
                f"distribution (ties allowed) up to {EXACT_MAX_ARRANGEMENTS:,} arrangements, else the normal "
                f"approximation; Benjamini–Hochberg q over all tested cohort pairs and cell types; tested "
                f"only with >= {MIN_UNITS_PER_COHORT} {plural} per cohort and a smallest attainable p <= {alpha:g}"
            ),
        },
        "cell_level": {
            "table": "comparison",
            "scope": POOLED_SCOPE,
            "test": "Fisher's exact test on the pooled 2x2 table (type vs other typed cells), Newcombe interval, BH q; "
            "treats every cell as an independent sample, so its p-values overstate the evidence",
        },
    }


def write_results(result: CohortResult, out_dir: str | Path) -> list[Path]:
    """Write every table as ``<name>.parquet`` and ``<name>.csv``, plus ``unmatched.csv`` and
    ``summary.json`` (:func:`summarize`), under ``out_dir``."""
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
    (out / "summary.json").write_text(
        json.dumps(summarize(result), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    written.append(out / "summary.json")
    return written
