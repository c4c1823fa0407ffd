"""``python -m pipeline cohort --output LOCATION --manifest cohorts.csv``: cohort statistics.

The printed summary leads with the patient-level comparison (or says plainly that the cohorts are
too small for any test); the pooled cell-level figures follow, labelled descriptive only.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = (
    "per-cohort differential counts, attribute frequencies and cohort comparisons (Parquet + CSV)"
)

#: per-unit values are listed up to this many units per cohort, else median and range
_LIST_UNITS = 6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        required=True,
        metavar="LOCATION",
        help="output location of the nightly job: a directory or s3://bucket/prefix",
    )
    parser.add_argument(
        "--manifest",
        required=True,
        metavar="CSV",
        help="CSV with slide_id or slide_uri, cohort, optional patient and extra columns",
    )
    parser.add_argument(
        "--out",
        default="cohort_results",
        metavar="DIR",
        help="directory for the result tables (default: cohort_results)",
    )
    parser.add_argument(
        "--exclude-flagged", action="store_true", help="leave out cells carrying any QC flag"
    )
    parser.add_argument(
        "--allow-unknown",
        action="store_true",
        help="report manifest slides missing from the outputs instead of failing",
    )
    parser.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="stdout: a text summary (default) or summary.json's content",
    )
    parser.add_argument(
        "--s3-endpoint", metavar="URL", help="S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS)"
    )


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _values(units: list[dict], cohort: str, cell_type: str) -> str:
    """A cohort's per-unit proportions of one cell type: listed when few, else median and range."""
    mine = sorted(
        (r for r in units if r["cohort"] == cohort and r["cell_type"] == cell_type),
        key=lambda r: r["unit"],
    )
    if not mine:
        return f"{cohort}: no units"
    props = sorted(r["proportion"] for r in mine)
    median = (
        props[len(props) // 2]
        if len(props) % 2
        else (props[len(props) // 2 - 1] + props[len(props) // 2]) / 2
    )
    if len(mine) <= _LIST_UNITS:
        detail = ", ".join(f"{r['unit']} {_pct(r['proportion'])}" for r in mine)
    else:
        detail = f"range {_pct(props[0])}–{_pct(props[-1])}"
    return f"{cohort} median {_pct(median)} ({detail})"


def _print_text(result, summary: dict) -> None:
    from pipeline.cohort import POOLED_SCOPE

    unit = summary["unit"]
    print(summary["headline"])
    print()
    print(
        f"Patient level ({unit}s as units; per-{unit} proportions of typed cells, Mann–Whitney U, BH q):"
    )
    for cohort, c in summary["cohorts"].items():
        units_word = (
            unit
            if c["units"] == 1
            else {"patient": "patients", "slide": "slides"}.get(unit, "units")
        )
        print(
            f"  {cohort}: {c['units']} {units_word}, {c['slides']} slide(s), {c['typed_cells']} typed cells"
        )
    units = result.units.to_pylist()
    for r in result.unit_comparison.to_pylist():
        test = (
            f"p {r['p_value']:.3g}, q {r['q_value']:.3g}"
            if r["p_value"] is not None
            else "not tested (too few units)"
        )
        print(
            f"  {r['cohort_a']} vs {r['cohort_b']}  {r['cell_type']:<22} {_values(units, r['cohort_a'], r['cell_type'])}"
            f"  |  {_values(units, r['cohort_b'], r['cell_type'])}  |  {test}"
        )
    print()
    print(f"Cell level ({POOLED_SCOPE}):")
    d = result.differential.to_pylist()
    for cohort in sorted({r["cohort"] for r in d}):
        rows = [r for r in d if r["cohort"] == cohort]
        print(
            f"  {cohort}: {rows[0]['slides']} slides, {rows[0]['typed_cells']} typed cells (95% Wilson interval, cells pooled)"
        )
        for r in rows:
            if r["count"]:
                print(
                    f"    {r['cell_type']:<22} {r['count']:>6}  {100 * r['proportion']:5.1f}% "
                    f"[{100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f}]"
                )
    print(
        f"  Fisher's exact test on pooled cells with Newcombe intervals: comparison.csv ({POOLED_SCOPE})"
    )


def main(args: argparse.Namespace) -> int:
    from pipeline.cohort import cohort_analysis, summarize, write_results

    result = cohort_analysis(
        args.output,
        args.manifest,
        s3_endpoint=args.s3_endpoint,
        exclude_flagged=args.exclude_flagged,
        allow_unknown=args.allow_unknown,
    )
    written = write_results(result, args.out)
    summary = summarize(result)
    if args.format == "json":
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        _print_text(result, summary)
    for m in result.unmatched_manifest:
        print(f"warning: manifest {m}", file=sys.stderr)
    if result.unlisted_slides:
        print(
            f"note: {len(result.unlisted_slides)} slide(s) with cells are not in the manifest (listed in unmatched.csv)",
            file=sys.stderr,
        )
    print(
        f"wrote {len(written)} files to {args.out}",
        file=sys.stderr if args.format == "json" else sys.stdout,
    )
    return 0
