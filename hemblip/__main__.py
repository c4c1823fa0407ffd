"""``python -m hemblip <command>``: one module per command under ``hemblip/cli/``.

Each module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``main(args) -> int``;
modules are imported lazily (see :mod:`hemblip.dispatch`).
"""

from __future__ import annotations

import argparse
import sys

from hemblip import dispatch
from hemblip.errors import HemblipError

COMMANDS: dict[str, str] = {
    "train": "hemblip.cli.train",
    "evaluate": "hemblip.cli.evaluate",
    "caption": "hemblip.cli.caption",
    "calibrate": "hemblip.cli.calibrate",
    "build-demo-data": "hemblip.cli.build_demo_data",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser (with ``only``, just that command's module is imported)."""
    return dispatch.build_parser("python -m hemblip", __doc__.splitlines()[0], COMMANDS, only)


def main(argv: list[str] | None = None) -> int:
    return dispatch.run(build_parser, argv, HemblipError)


if __name__ == "__main__":
    sys.exit(main())
