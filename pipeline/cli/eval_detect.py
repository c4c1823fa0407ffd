"""``python -m pipeline eval-detect``: white-cell detection precision/recall/F1 on labelled images."""

from __future__ import annotations

import json
from pathlib import Path

HELP = "precision/recall/F1 of white-cell detection against YOLO .txt or VOC .xml labels"


def add_arguments(parser) -> None:
    parser.add_argument("--images", required=True, metavar="DIR", help="directory of images")
    parser.add_argument(
        "--labels",
        required=True,
        metavar="DIR",
        help="YOLO .txt (class 0 = WBC) or VOC .xml per image stem",
    )
    parser.add_argument(
        "--source-map", metavar="CSV", help="CSV with an image id column and 'source'"
    )
    parser.add_argument(
        "--source-name",
        metavar="NAME",
        help="source of images not in the map (default: from the folder name)",
    )
    parser.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="µm/px of every image (default: estimated per image from red cells)",
    )
    parser.add_argument(
        "--detect-mpp",
        type=float,
        default=None,
        metavar="X",
        help="detect on each image area-reduced to X µm/px, as on a coarser pyramid level (default: the image as it is)",
    )
    parser.add_argument(
        "--detect-jpeg",
        type=int,
        default=None,
        metavar="Q",
        help="re-encode the image detection sees as JPEG of quality Q (4:2:0), as a scanner stores a level",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument(
        "--json", metavar="OUT", help="write the full result (per image, errors) as JSON"
    )


def main(args) -> int:
    from pipeline.eval_detect import evaluate_detection, format_table

    res = evaluate_detection(
        args.images,
        args.labels,
        source_map=args.source_map,
        mpp=args.mpp,
        default_source=args.source_name,
        limit=args.limit,
        detect_mpp=args.detect_mpp,
        jpeg_quality=args.detect_jpeg,
    )
    print(format_table(res))
    if args.detect_mpp is not None:
        print(f"detection at {args.detect_mpp} µm/px (images area-reduced to it)")
    if args.detect_jpeg is not None:
        print(f"detection input re-encoded as JPEG quality {args.detect_jpeg} (4:2:0)")
    print(f"{res['n_images']} images in {res['seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=float))
    return 0
