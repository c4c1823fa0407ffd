"""``python -m pipeline config-docs``: regenerate (or check) the settings docs and schema."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.errors import ConfigError

HELP = (
    "regenerate docs/settings.md and cluster/job-config.schema.json from JobConfig "
    "(--check: exit 1 when one is out of date)"
)


def _checkout() -> Path:
    return Path(__file__).resolve().parents[2]


def add_arguments(parser) -> None:
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 naming each file that differs from what JobConfig generates",
    )
    parser.add_argument(
        "--root",
        metavar="DIR",
        default=None,
        help="repository root holding docs/ and cluster/ (default: the checkout of this package)",
    )
    parser.add_argument(
        "--print",
        dest="show",
        choices=("schema", "docs"),
        default=None,
        help="print one generated file on stdout instead",
    )


def main(args) -> int:
    from pipeline.job.settings_docs import generated_files, json_schema_text, settings_markdown

    if args.show:
        print(json_schema_text() if args.show == "schema" else settings_markdown(), end="")
        return 0
    root = Path(args.root) if args.root else _checkout()
    if not root.is_dir():
        raise ConfigError(f"--root {root}: not a directory")
    stale = []
    for rel, text in generated_files().items():
        path = root / rel
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if current == text:
            print(f"{rel.as_posix()}: up to date")
            continue
        if args.check:
            stale.append(rel.as_posix())
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot write ({exc.strerror or exc})") from None
        print(f"{rel.as_posix()}: written")
    for rel in stale:
        print(
            f"{rel}: out of date with pipeline/job/config.py; run: python -m pipeline config-docs",
            file=sys.stderr,
        )
    return 1 if stale else 0
