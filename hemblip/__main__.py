"""``python -m hemblip <command>``: one module per command under ``hemblip/cli/``.

Command modules are imported lazily so that ``caption`` never pays for importing Ray.
Each module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hemblip.errors import HemblipError

COMMANDS: dict[str, str] = {
    "train": "hemblip.cli.train",
    "evaluate": "hemblip.cli.evaluate",
    "caption": "hemblip.cli.caption",
    "build-demo-data": "hemblip.cli.build_demo_data",
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
    parser = argparse.ArgumentParser(prog="python -m hemblip", description=__doc__.splitlines()[0])
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
    except HemblipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
