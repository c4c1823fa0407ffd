"""``python -m hemblip calibrate``: fit the cell-type confidence's temperature on validation cells.

Writes ``calibration.json`` next to the checkpoint's weights (or into ``--out``), prints the
expected calibration error before (T = 1) and after, and the 10-bin reliability table; with
``--diagram`` also an SVG reliability diagram.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

HELP = "calibrate a checkpoint's per-cell cell-type confidence on validation cells (writes calibration.json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint directory or s3:// URI (default: the bundled demo checkpoint)",
    )
    parser.add_argument(
        "--base",
        default=None,
        metavar="DIR|URI",
        help="for a LoRA adapter --model: the base model to use instead of the one "
        "the adapter names",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="dataset with known cell types: WBCAtt/generic CSV, LeukemiaAttri COCO "
        "JSON, a folder with samples.csv, or the shared data folder (demo dataset)",
    )
    parser.add_argument(
        "--split",
        default="val",
        choices=("train", "val", "test", "all"),
        help="cells to fit on (default val; never the test cells you report on)",
    )
    parser.add_argument(
        "--held-out-split",
        default=None,
        choices=("train", "val", "test"),
        help="also report the fitted temperature's figures on this split (cells "
        "not used to fit it, e.g. test, reported once)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="cells without a split of their own: share put in val (default 0.1, "
        "as train/evaluate)",
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="captioning batch size (default 32)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder for calibration.json (default: the --model folder; required "
        "for an s3:// or hub model)",
    )
    parser.add_argument(
        "--diagram",
        type=Path,
        default=None,
        metavar="FILE.svg",
        help="write the reliability diagram (SVG) here",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the figures, write nothing")


def _out_dir(args: argparse.Namespace) -> Path:
    from hemblip.errors import HemblipConfigError
    from hemblip.inference import DEMO_CHECKPOINT

    if args.out is not None:
        return args.out
    if args.model is None:
        return DEMO_CHECKPOINT
    if not str(args.model).startswith("s3://") and Path(args.model).is_dir():
        return Path(args.model)
    raise HemblipConfigError(
        f"--model {args.model!r} is not a local folder: give --out DIR for calibration.json"
    )


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main(args: argparse.Namespace) -> int:
    from hemblip.calibration import (
        calibrate_captioner,
        reliability_markdown,
        reliability_svg,
        write_calibration,
    )
    from hemblip.data import load_dataset, split_samples
    from hemblip.errors import DatasetError, HemblipConfigError
    from hemblip.inference import Captioner

    if args.batch_size < 1:
        raise HemblipConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise HemblipConfigError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.held_out_split is not None and args.held_out_split == args.split:
        raise HemblipConfigError(f"--held-out-split {args.held_out_split} is the split fitted on")
    if args.diagram is not None and args.diagram.suffix.lower() != ".svg":
        raise HemblipConfigError(f"--diagram {args.diagram}: must end in .svg")
    out_dir = None if args.dry_run else _out_dir(args)
    samples = load_dataset(args.data)
    splits = split_samples(samples, args.val_fraction, args.seed)
    fit = samples if args.split == "all" else splits[args.split]
    held = splits[args.held_out_split] if args.held_out_split else None
    if not fit:
        raise DatasetError(f"{args.data}: no cells in split {args.split!r}")
    cap = Captioner(args.model, device=args.device, batch_size=args.batch_size, base=args.base)
    try:
        report = calibrate_captioner(cap, fit, held)
    except ValueError as exc:
        raise DatasetError(f"{args.data} ({args.split}): {exc}") from None
    t = report["temperature"]
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    f = report["fit"]
    print(
        f"model {cap.model_id} (version {cap.model_version}); data {args.data}, split {args.split}: "
        f"{f['n_cells']} cells, {f['n_typed']} captions name a type, {_fmt(f['accuracy'])} of those right"
    )
    print(
        f"temperature T = {t:.3f}; ECE {_fmt(f['before']['ece'])} -> {_fmt(f['after']['ece'])}, "
        f"log-loss {_fmt(f['before']['nll'])} -> {_fmt(f['after']['nll'])} nats (10 bins, {date})"
    )
    print("\nreliability after calibration:\n" + reliability_markdown(f["after"]["reliability"]))
    print("\nreliability before (T = 1):\n" + reliability_markdown(f["before"]["reliability"]))
    h = report.get("held_out")
    if h:
        print(
            f"\nheld-out split {args.held_out_split}: {h['n_cells']} cells, {h['n_typed']} typed, "
            f"{_fmt(h['accuracy'])} right; ECE {_fmt(h['before']['ece'])} -> {_fmt(h['after']['ece'])}, "
            f"log-loss {_fmt(h['before']['nll'])} -> {_fmt(h['after']['nll'])} nats"
        )
        print(reliability_markdown(h["after"]["reliability"]))
    if args.diagram is not None:
        svg = reliability_svg(
            f["before"]["reliability"],
            f["after"]["reliability"],
            title=f"Cell-type confidence, {f['n_typed']} {args.split} cells ({date})",
            ece_before=f["before"]["ece"],
            ece_after=f["after"]["ece"],
            temperature=t,
        )
        args.diagram.parent.mkdir(parents=True, exist_ok=True)
        args.diagram.write_text(svg, encoding="utf-8")
        print(f"\nwrote {args.diagram}")
    if out_dir is not None:
        summary = {
            k: {
                "n_cells": v["n_cells"],
                "n_typed": v["n_typed"],
                "accuracy": v["accuracy"],
                "ece_before": v["before"]["ece"],
                "ece_after": v["after"]["ece"],
                "nll_before": v["before"]["nll"],
                "nll_after": v["after"]["nll"],
            }
            for k, v in report.items()
            if k in ("fit", "held_out")
        }
        try:
            path = write_calibration(
                out_dir,
                t,
                cap.model_version,
                method="temperature scaling of cell-type opening scores",
                data=str(args.data),
                split=args.split,
                held_out_split=args.held_out_split,
                val_fraction=args.val_fraction,
                seed=args.seed,
                date=date,
                reliability=f["after"]["reliability"],
                **summary,
            )
        except OSError as exc:
            raise HemblipConfigError(
                f"{out_dir}: cannot write calibration.json: {exc.strerror or exc}"
            ) from None
        print(f"wrote {path}")
        json.loads(path.read_text(encoding="utf-8"))  # what was written reads back
    return 0
