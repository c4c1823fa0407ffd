"""``python -m pipeline report --output LOCATION --out report.html``: static HTML review report."""

from __future__ import annotations

import argparse

HELP = "write a self-contained HTML report: runs, per-slide differential counts, cell gallery"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        required=True,
        metavar="LOCATION",
        help="output location of the nightly job: a directory or s3://bucket/prefix",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="HTML file to write (missing directories are created; an existing file is replaced whole, "
        "only once the report is complete)",
    )
    parser.add_argument(
        "--slide", metavar="ID", help="only this slide (id, unique id prefix or URI)"
    )
    parser.add_argument(
        "--manifest", metavar="CSV", help="cohort manifest: adds the cohort section (see `cohort`)"
    )
    parser.add_argument(
        "--thumb-px",
        type=int,
        default=112,
        metavar="PX",
        help="re-encode thumbnails to PX pixels, the gallery's display size (0: keep the stored JPEGs; default 112)",
    )
    parser.add_argument(
        "--page-size",
        type=int,
        default=100,
        metavar="N",
        help="cells per gallery page (default 100)",
    )
    parser.add_argument(
        "--s3-endpoint", metavar="URL", help="S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS)"
    )


def main(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError
    from pipeline.report import build_report

    if args.thumb_px < 0:
        raise ConfigError(f"--thumb-px must be >= 0, got {args.thumb_px}")
    stats = build_report(
        args.output,
        args.out,
        slide=args.slide,
        manifest=args.manifest,
        s3_endpoint=args.s3_endpoint,
        thumb_px=args.thumb_px,
        page_size=args.page_size,
    )
    print(
        f"wrote {stats.path}: {stats.slides} slides, {stats.cells} cells, "
        f"{stats.bytes / 1e6:.1f} MB in {stats.seconds:.1f} s"
    )
    return 0
