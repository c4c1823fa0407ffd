"""``python -m hemblip train``: fine-tune a BLIP captioner (full or LoRA), locally or on Ray Train."""

from __future__ import annotations

import argparse
import json
import sys

from hemblip.errors import HemblipConfigError

HELP = "fine-tune a BLIP captioner (full or LoRA) on caption data; --workers N uses Ray Train"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        help="dataset: WBCAtt/generic CSV, LeukemiaAttri JSON, a directory with "
        "samples.csv, or the shared data folder (demo dataset)",
    )
    parser.add_argument(
        "--val-data",
        default=None,
        help="separate validation dataset (default: the data's own val split, "
        "else a stratified 10%% of it)",
    )
    parser.add_argument("--mode", choices=("full", "lora"), default="full")
    parser.add_argument(
        "--base",
        default="tiny",
        help="model to start from: checkpoint dir, s3:// URI, hub id, or a config "
        "spec building a fresh, randomly initialised model: tiny | "
        "random-demo-shape (the bundled demo checkpoint's shape, not its "
        "weights) | blip-base | config:NAME[,key=value...] (default: tiny)",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of all steps")
    parser.add_argument(
        "--patience",
        type=int,
        default=2,
        help="early stopping: epochs without a better validation loss",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/_resume")
    parser.add_argument("--no-augment", action="store_true", help="same as --augment none")
    parser.add_argument(
        "--augment",
        default="all",
        metavar="KIND,...",
        help="training-split augmentations, comma-separated: geometry (90° "
        "rotations, flips, centre shift), scale, stain, resolution, jpeg; "
        "'all' (default) or 'none'",
    )
    parser.add_argument(
        "--aug-scale",
        type=float,
        default=0.2,
        metavar="S",
        help="field of view x U(1-S, 1+S), as a slide whose scale is off (default 0.2)",
    )
    parser.add_argument(
        "--aug-hue",
        type=float,
        default=0.04,
        metavar="H",
        help="hue rotation within ±H of the colour circle (default 0.04)",
    )
    parser.add_argument(
        "--aug-saturation",
        default="0.8,1.2",
        metavar="LO,HI",
        help="saturation factor range (default 0.8,1.2)",
    )
    parser.add_argument(
        "--aug-resolution-mpp",
        default="0.22,0.28",
        metavar="LO,HI",
        help="scan scale (µm/px) the resolution degradation resamples to "
        "(default 0.22,0.28: 40x scanners)",
    )
    parser.add_argument(
        "--aug-jpeg",
        default="70,95",
        metavar="LO,HI",
        help="JPEG quality range of the jpeg augmentation (default 70,95)",
    )
    parser.add_argument(
        "--context",
        type=float,
        default=None,
        help="cut training crops this many times wider than the job's field so "
        "scale augmentation zooms out onto real smear (default: 1 + "
        "--aug-scale with scale augmentation, else 1)",
    )
    parser.add_argument(
        "--balance",
        choices=("none", "class"),
        default="none",
        help="class: each cell type drawn equally often per epoch (default none)",
    )
    parser.add_argument(
        "--max-length", type=int, default=64, help="caption tokens incl. [DEC]/[SEP]"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="stop after N optimiser steps")
    parser.add_argument(
        "--oversample",
        action="append",
        default=[],
        metavar="SOURCE=K",
        help="repeat the samples of one source K times per epoch (repeatable)",
    )
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument(
        "--lora-full-layers",
        type=int,
        default=None,
        help="last decoder layers trained in full in LoRA mode (default 2; --lora-save paper only)",
    )
    parser.add_argument(
        "--lora-save",
        choices=("paper", "adapters-only"),
        default="paper",
        help="LoRA mode: paper = the paper code's (default): embeddings, LM head "
        "and the last --lora-full-layers decoder layers trained and saved in "
        "full with the adapters (19.5%% of BLIP-base, a 269 MB adapter); "
        "adapters-only = only LoRA adapters, on every decoder layer's "
        "cross-attention, are trained and saved (0.26%%, about 2.4 MB)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="N >= 1: data-parallel on Ray Train with N workers (0: this process)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--log-every", type=int, default=10)


def _context(args: argparse.Namespace) -> float:
    if args.context is not None:
        return args.context
    from hemblip.augment import parse_kinds

    kinds = () if args.no_augment else parse_kinds(args.augment)
    scale = (
        args.aug_scale if isinstance(args.aug_scale, float) and 0 <= args.aug_scale <= 0.5 else 0.0
    )
    return 1.0 + scale if "scale" in kinds else 1.0


def _oversample(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        source, eq, k = item.partition("=")
        if not eq:
            raise HemblipConfigError(f"--oversample {item!r}: expected SOURCE=K")
        try:
            out[source] = int(k)
        except ValueError:
            raise HemblipConfigError(f"--oversample {item!r}: K must be an integer") from None
    return out


def _range(flag: str, text: str) -> tuple[float, float]:
    parts = str(text).split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise HemblipConfigError(f"{flag} {text!r}: expected two numbers LO,HI") from None
    return lo, hi


def main(args: argparse.Namespace) -> int:
    from hemblip.lora import LoraSettings
    from hemblip.train import TrainConfig, load_splits, train

    config = TrainConfig(
        out=args.out,
        base=args.base,
        mode=args.mode,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_fraction=args.warmup,
        patience=args.patience,
        seed=args.seed,
        resume=args.resume,
        augment=False if args.no_augment else args.augment,
        aug_scale=args.aug_scale,
        aug_hue=args.aug_hue,
        aug_saturation=_range("--aug-saturation", args.aug_saturation),
        aug_resolution_mpp=_range("--aug-resolution-mpp", args.aug_resolution_mpp),
        aug_jpeg=_range("--aug-jpeg", args.aug_jpeg),
        context=_context(args),
        balance=args.balance,
        max_length=args.max_length,
        max_steps=args.max_steps,
        workers=args.workers,
        log_every=args.log_every,
        oversample=_oversample(args.oversample),
        lora=LoraSettings(
            r=args.lora_r,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            full_layers=args.lora_full_layers,
            save=args.lora_save,
        ),
    )
    if args.threads is not None:
        if args.threads < 1:
            raise HemblipConfigError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    splits = load_splits(args.data, args.val_data, seed=args.seed, context=config.context)
    print(
        f"data {args.data}: {len(splits['train'])} train, {len(splits['val'])} val, "
        f"{len(splits['test'])} test (held out)",
        flush=True,
    )
    if config.workers >= 1:
        from hemblip.train_ray import train_distributed

        result = train_distributed(config, splits["train"], splits["val"])
    else:
        result = train(config, splits["train"], splits["val"], log=lambda m: print(m, flush=True))
    summary = {
        "out": str(result.out),
        "best_val_loss": round(result.best_val_loss, 5),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "trainable_share": round(result.trainable_share, 5),
    }
    print(json.dumps(summary), file=sys.stdout, flush=True)
    return 0
