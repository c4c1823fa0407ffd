"""``python -m pipeline eval-smear``: zone-limited detection on generated whole smears vs truth."""

from __future__ import annotations

import json
from pathlib import Path

HELP = "recall/precision of zone-limited detection, zone agreement and level-0 reads on generated whole smears"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--large",
        action="store_true",
        help="two 0.5 GP slides (8 x 4 mm) instead of four 72 MP ones",
    )
    parser.add_argument(
        "--zones",
        default="monolayer",
        metavar="Z[,Z]",
        help="zones whose cells are described: glass, thick, monolayer, feathered (default monolayer)",
    )
    parser.add_argument(
        "--max-cells-per-slide",
        type=int,
        default=None,
        metavar="N",
        help="spatially uniform sample of N cells",
    )
    parser.add_argument(
        "--per-source",
        type=int,
        default=1,
        metavar="N",
        help="slides per source (seeds +10 each; default 1): a steadier per-source figure",
    )
    parser.add_argument(
        "--keep", metavar="DIR", help="write the generated slides here (default: a temp dir)"
    )
    parser.add_argument("--json", metavar="OUT", help="write the full result as JSON")


def main(args) -> int:
    from pipeline.eval_smear import evaluate_smears, format_table

    select = tuple(z.strip() for z in args.zones.split(",") if z.strip())
    res = evaluate_smears(
        large=args.large,
        select=select,
        max_cells=args.max_cells_per_slide,
        out_dir=args.keep,
        per_source=args.per_source,
    )
    print(format_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=float))
    return 1 if res["errors"] else 0
