"""The ``python -m <package> <command>`` dispatcher shared by ``hemblip`` and ``pipeline``.

Command modules are imported lazily (only the one named on the command line), so a light command
never pays for importing Ray or torch. Each module defines ``HELP`` (one line),
``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping, Sequence


def build_parser(
    prog: str, description: str, commands: Mapping[str, str], only: str | None = None
) -> argparse.ArgumentParser:
    """Parser with one sub-command per entry of ``commands`` (name -> module path).

    With ``only`` naming a known command, just that module is imported.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = [only] if only in commands else list(commands)
    for name in names:
        mod = importlib.import_module(commands[name])
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def run(build, argv: Sequence[str] | None, error_type: type[BaseException]) -> int:
    """Parse ``argv`` with ``build(first_word)`` and run the command.

    Errors of ``error_type`` (the package's base exception) print ``error: <message>`` and
    return 2; Ctrl-C returns 130.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    args = build(first).parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except error_type as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
