"""``python -m pipeline export-qupath --output LOCATION --slide ID --out cells.geojson``."""

from __future__ import annotations

import argparse

HELP = "export one slide's cells as QuPath-compatible GeoJSON detections"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        required=True,
        metavar="LOCATION",
        help="output location of the nightly job: a directory or s3://bucket/prefix",
    )
    parser.add_argument(
        "--slide", required=True, metavar="ID", help="slide id, unique id prefix, or slide URI"
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="GeoJSON file to write")
    parser.add_argument(
        "--s3-endpoint", metavar="URL", help="S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS)"
    )


def main(args: argparse.Namespace) -> int:
    from pipeline.qupath import export_qupath

    n = export_qupath(args.output, args.slide, args.out, s3_endpoint=args.s3_endpoint)
    print(f"wrote {n} detections to {args.out}")
    return 0
