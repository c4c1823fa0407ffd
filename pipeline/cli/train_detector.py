"""``python -m pipeline train-detector``: train the candidate verifier of white-cell detection.

The work is :func:`pipeline.detection.train.main`; this module only registers it as a command
(its flags are forwarded unchanged, and it checks them).
"""

from __future__ import annotations

HELP = "train the white-cell candidate verifier (verifier.npz) on the TXL-PBC train split, on CPU"

# (flag, metavar, help); every one is optional except --data and forwarded only when given,
# so the defaults stay those of pipeline.detection.train.
_FLAGS = (
    ("--data", "DIR", "txl_pbc root (source_map.csv, images/, labels/) (required)"),
    ("--out", "NPZ", "where to write the weights (default: the bundled verifier.npz)"),
    ("--cache", "NPZ", "npz cache of the collected features (reused when it matches)"),
    ("--limit", "N", "first N training images only"),
    ("--jobs", "N", "processes generating candidates; results do not depend on it (default 2)"),
    ("--seed", "N", "seeds the JPEG qualities and the MLP initialisation (default 0)"),
    ("--conditions", "LIST", "comma-separated storage conditions to train on (default: all)"),
)


def add_arguments(parser) -> None:
    for flag, metavar, help_ in _FLAGS:
        parser.add_argument(
            flag, metavar=metavar, default=None, required=flag == "--data", help=help_
        )


def forwarded(args) -> list[str]:
    """The flags given, as the module's own argument list."""
    out: list[str] = []
    for flag, _, _ in _FLAGS:
        value = getattr(args, flag[2:])
        if value is not None:
            out += [flag, str(value)]
    return out


def main(args) -> int:
    from pipeline.detection import train as _train_cmd

    return int(_train_cmd.main(forwarded(args)) or 0)
