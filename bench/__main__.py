"""``python -m bench [NAME...]``: run all (or the named) ``bench_*`` modules and print a table."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback
from pathlib import Path


def _modules() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "names", nargs="*", help="bench modules to run, e.g. bench_detect (default: all)"
    )
    args = parser.parse_args(argv)
    available = _modules()
    wanted = args.names or available
    unknown = [n for n in wanted if n not in available]
    if unknown:
        print(
            f"error: unknown bench module(s) {', '.join(unknown)}; have {', '.join(available)}",
            file=sys.stderr,
        )
        return 2
    rows: list[tuple[str, dict]] = []
    failed = 0
    for name in wanted:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            for row in importlib.import_module(f"bench.{name}").run():
                rows.append((name, row))
        except Exception:  # noqa: BLE001 - one broken bench must not hide the others
            failed += 1
            print(f"error: {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
    head = ("bench", "name", "value", "unit", "goal")
    table = [head] + [
        (b, r["name"], _fmt(r["value"]), r.get("unit") or "", r.get("goal") or "") for b, r in rows
    ]
    widths = [max(len(str(t[i])) for t in table) for i in range(len(head))]
    for k, t in enumerate(table):
        print(
            "  ".join(
                str(c).ljust(w) if i != 2 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(t, widths))
            )
        )
        if k == 0:
            print("  ".join("-" * w for w in widths))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
