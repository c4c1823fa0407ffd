"""``python -m pipeline demo``: the embedded default (local S3 server + local Ray + demo model)."""

from __future__ import annotations

import argparse

HELP = "run the whole nightly job locally: moto S3 on 127.0.0.1, local Ray, demo checkpoint, Parquet in ./demo_output"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        default="demo_output",
        metavar="DIR",
        help="local output directory, recreated by each demo run (default: ./demo_output)",
    )
    parser.add_argument(
        "--caption-batch-size",
        type=int,
        default=16,
        metavar="N",
        help="crops per caption batch (default 16)",
    )
    parser.add_argument(
        "--model", metavar="DIR", help="checkpoint to use instead of the bundled demo checkpoint"
    )
    parser.add_argument(
        "--no-rerun",
        dest="rerun",
        action="store_false",
        help="skip the second run that shows nothing new is processed",
    )


def main(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError
    from pipeline.job.demo import run_demo

    if args.caption_batch_size < 1:
        raise ConfigError(f"--caption-batch-size must be >= 1, got {args.caption_batch_size}")
    result = run_demo(
        args.output, caption_batch_size=args.caption_batch_size, rerun=args.rerun, model=args.model
    )
    return result.first.exit_code
