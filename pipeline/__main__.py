"""``python -m pipeline <command>``: one module per command under ``pipeline/cli/``.

Command modules are imported lazily so that ``detect`` never pays for importing Ray or torch.
Each module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.errors import PipelineError

COMMANDS: dict[str, str] = {
    "detect": "pipeline.cli.detect",
    "eval-detect": "pipeline.cli.eval_detect",
    "make-samples": "pipeline.cli.make_samples",
    "run": "pipeline.cli.run",
    "demo": "pipeline.cli.demo",
    "query": "pipeline.cli.query",
    "cohort": "pipeline.cli.cohort",
    "report": "pipeline.cli.report",
    "export-qupath": "pipeline.cli.export_qupath",
}


def _available() -> dict[str, object]:
    mods = {}
    for name, modname in COMMANDS.items():
        try:
            mods[name] = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name != modname:  # a real missing dependency inside the module: surface it
                raise
    return mods


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if only is not None and only in COMMANDS:
        mods = {only: importlib.import_module(COMMANDS[only])}
    else:
        mods = _available()
    for name, mod in mods.items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(first).parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
