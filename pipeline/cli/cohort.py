"""``python -m pipeline cohort --output LOCATION --manifest cohorts.csv``: cohort statistics."""

from __future__ import annotations

import argparse
import sys

HELP = "per-cohort differential counts, attribute frequencies and cohort comparisons (Parquet + CSV)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, metavar="LOCATION", help="output location of the nightly job: a directory or s3://bucket/prefix")
    parser.add_argument("--manifest", required=True, metavar="CSV", help="CSV with slide_id or slide_uri, cohort, optional patient and extra columns")
    parser.add_argument("--out", default="cohort_results", metavar="DIR", help="directory for the result tables (default: cohort_results)")
    parser.add_argument("--exclude-flagged", action="store_true", help="leave out cells carrying any QC flag")
    parser.add_argument("--allow-unknown", action="store_true", help="report manifest slides missing from the outputs instead of failing")
    parser.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS)")


def main(args: argparse.Namespace) -> int:
    from pipeline.cohort import cohort_analysis, write_results

    result = cohort_analysis(args.output, args.manifest, s3_endpoint=args.s3_endpoint,
                             exclude_flagged=args.exclude_flagged, allow_unknown=args.allow_unknown)
    written = write_results(result, args.out)
    d = result.differential.to_pylist()
    for cohort in sorted({r["cohort"] for r in d}):
        rows = [r for r in d if r["cohort"] == cohort]
        n = rows[0]["typed_cells"] if rows else 0
        print(f"{cohort}: {rows[0]['slides'] if rows else 0} slides, {n} typed cells")
        for r in rows:
            if r["count"]:
                print(f"  {r['cell_type']:<22} {r['count']:>6}  {100 * r['proportion']:5.1f}% "
                      f"[{100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f}]")
    sig = [r for r in result.comparison.to_pylist() if r["q_value"] is not None and r["q_value"] < 0.05]
    print(f"{len(sig)} cell-type differences with BH q < 0.05 (cell-level Fisher exact)")
    for m in result.unmatched_manifest:
        print(f"warning: manifest {m}", file=sys.stderr)
    if result.unlisted_slides:
        print(f"note: {len(result.unlisted_slides)} slide(s) with cells are not in the manifest (listed in unmatched.csv)", file=sys.stderr)
    print(f"wrote {len(written)} files to {args.out}")
    return 0
