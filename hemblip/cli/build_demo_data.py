"""``python -m hemblip build-demo-data``: the demo training set as PNG crops + a generic CSV."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

HELP = "build the demo caption dataset (PBC/WBCAtt, BCCD, segmentation_WBC crops) as PNG + CSV"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shared",
        required=True,
        type=Path,
        help="the shared data folder (holds txl_pbc/, bccd/, segmentation_wbc/)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of cells without a split of their own put in val (default 0.1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument("--crop-px", type=int, default=224, help="crop side in px (default 224)")
    parser.add_argument(
        "--framing",
        choices=("physical", "box"),
        default="physical",
        help="physical (default): the job's 36 µm crop at each image's scale; box: "
        "the old 2.5 x cell box crop (for comparisons only)",
    )


def main(args: argparse.Namespace) -> int:
    from hemblip.data import build_demo_dataset, split_samples, write_generic_csv
    from hemblip.errors import HemblipConfigError

    if not 0.0 <= args.val_fraction < 1.0:
        raise HemblipConfigError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.crop_px < 16:
        raise HemblipConfigError(f"--crop-px must be >= 16, got {args.crop_px}")
    samples = build_demo_dataset(
        args.shared, crop_px=args.crop_px, framing=getattr(args, "framing", "physical")
    )
    splits = split_samples(samples, args.val_fraction, args.seed)
    ordered = [s for name in ("train", "val", "test") for s in splits[name]]
    csv_path = write_generic_csv(ordered, args.out)
    if samples.skipped:
        with (args.out / "skipped.tsv").open("w", encoding="utf-8") as fh:
            fh.write("item\treason\n")
            for sk in samples.skipped:
                fh.write(f"{sk.item}\t{sk.reason}\n")
    counts = Counter((s.source, s.split) for s in ordered)
    print(
        f"wrote {len(ordered)} samples to {csv_path} ({len(samples.skipped)} skipped"
        + (f", listed in {args.out / 'skipped.tsv'})" if samples.skipped else ")")
    )
    for (source, split), n in sorted(counts.items()):
        print(f"  {source:18s} {split:5s} {n}")
    scales = Counter((s.source, s.mpp_source) for s in ordered if s.mpp is not None)
    for (source, how), n in sorted(scales.items()):
        mpps = sorted(s.mpp for s in ordered if s.source == source and s.mpp_source == how)
        print(f"  scale {source:18s} {how:9s} {n} crops, median {mpps[len(mpps) // 2]:.4f} µm/px")
    return 0
