"""``python -m pipeline calibrate-consistency``: fit the thresholds of the consistency check.

The work is :func:`pipeline._calibrate_consistency.main`; this module only registers it as a
command (its flags are forwarded unchanged).
"""

from __future__ import annotations

HELP = "calibrate the thresholds of the caption/measurement consistency check on labelled cells"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="the shared data root holding the labelled cell datasets (default: ../shared/data "
        "next to this checkout)",
    )
    parser.add_argument(
        "--json",
        metavar="OUT",
        default=None,
        help="also write the results and per-cell measurements here",
    )


def forwarded(args) -> list[str]:
    """The flags given, as the module's own argument list."""
    out: list[str] = []
    for name in ("data", "json"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name}", str(value)]
    return out


def main(args) -> int:
    from pipeline import _calibrate_consistency

    return int(_calibrate_consistency.main(forwarded(args)) or 0)
