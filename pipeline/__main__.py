"""``python -m pipeline <command>``: one module per command under ``pipeline/cli/``.

Each module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``main(args) -> int``;
modules are imported lazily (see :mod:`hemblip.dispatch`).
"""

from __future__ import annotations

import argparse
import sys

from hemblip import dispatch
from pipeline.errors import PipelineError

COMMANDS: dict[str, str] = {
    "detect": "pipeline.cli.detect",
    "eval-detect": "pipeline.cli.eval_detect",
    "eval-slides": "pipeline.cli.eval_slides",
    "eval-smear": "pipeline.cli.eval_smear",
    "make-samples": "pipeline.cli.make_samples",
    "run": "pipeline.cli.run",
    "demo": "pipeline.cli.demo",
    "query": "pipeline.cli.query",
    "cohort": "pipeline.cli.cohort",
    "report": "pipeline.cli.report",
    "export-qupath": "pipeline.cli.export_qupath",
    "eval-segmentation": "pipeline.cli.eval_segmentation",
    "train-detector": "pipeline.cli.train_detector",
    "calibrate-consistency": "pipeline.cli.calibrate_consistency",
    "config-docs": "pipeline.cli.config_docs",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser (with ``only``, just that command's module is imported)."""
    return dispatch.build_parser("python -m pipeline", __doc__.splitlines()[0], COMMANDS, only)


def main(argv: list[str] | None = None) -> int:
    return dispatch.run(build_parser, argv, PipelineError)


if __name__ == "__main__":
    sys.exit(main())
