"""``python -m pipeline eval-segmentation``: nucleus and whole-cell Dice of the segmentation."""

from __future__ import annotations

import json
from pathlib import Path

HELP = "nucleus and whole-cell Dice of the cell segmentation on a segmentation_wbc-style dataset"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="segmentation_wbc-style root (one folder per dataset)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N", help="first N crops per dataset only"
    )
    parser.add_argument("--json", metavar="OUT", help="also write the result as JSON")


def main(args) -> int:
    from pipeline.errors import ConfigError
    from pipeline.eval_detect import evaluate_segmentation

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be an integer >= 1, got {args.limit}")
    root = Path(args.data)
    if not root.is_dir():
        raise ConfigError(f"--data {root}: not a directory")
    if not any(d.is_dir() and d.name.startswith("dataset") for d in root.iterdir()):
        raise ConfigError(f"--data {root}: no dataset*/ folders (a segmentation_wbc-style root)")
    res = evaluate_segmentation(args.data, limit=args.limit)
    for name, r in res["datasets"].items():
        print(
            f"{name:<10} n={r['n']:<4} mpp={r['mpp']:.3f}  nucleus Dice {r['nucleus_dice']:.3f}  "
            f"cell Dice {r['cell_dice']:.3f}"
        )
    print(
        f"mean over datasets: nucleus Dice {res['nucleus_dice']:.3f}  cell Dice {res['cell_dice']:.3f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0
