"""``python -m pipeline make-samples OUT_DIR``: write the bundled sample slides (pyramidal TIFF and
SVS built from real BCCD smear fields) and their ground-truth WBC boxes."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write the sample slides (generic TIFF + Aperio SVS pyramids) with ground-truth WBC boxes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "out_dir", type=Path, metavar="OUT_DIR", help="folder to write into (created)"
    )


def main(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError
    from pipeline.samples import build_sample_slides

    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise ConfigError(f"OUT_DIR: {args.out_dir} exists and is not a folder")
    for s in build_sample_slides(args.out_dir):
        print(f"{s.path}  {s.format}  {s.n_wbc} WBCs  truth: {s.truth_path}")
    return 0
