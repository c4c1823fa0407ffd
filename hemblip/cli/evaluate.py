"""``python -m hemblip evaluate``: caption a dataset split and report the paper's metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = (
    "evaluate a HemBLIP model on a caption dataset (BLEU, ROUGE-L, attribute accuracies, baseline)"
)


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
        "the adapter names (e.g. a local copy of Salesforce/blip-image-captioning-base)",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="dataset: WBCAtt/generic CSV, LeukemiaAttri COCO JSON, a folder with "
        "samples.csv, or the shared data folder (demo dataset)",
    )
    parser.add_argument(
        "--split",
        default="all",
        choices=("train", "val", "test", "all"),
        help="which split to evaluate (default all); cells without a split of their "
        "own are split with --val-fraction/--seed like build-demo-data",
    )
    parser.add_argument("--val-fraction", type=float, default=0.1, help="default 0.1")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N cells")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="captioning batch size (default 64)"
    )
    parser.add_argument("--num-beams", type=int, default=1, help="beam count (default 1, greedy)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="caption length limit in tokens (default: the model's)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--no-bertscore", action="store_true", help="skip BERTScore")
    parser.add_argument(
        "--bertscore-model",
        type=Path,
        default=None,
        metavar="DIR",
        help="local BERTScore model directory (config.json + safetensors, e.g. a "
        "copy of roberta-large); without it BERTScore is n/a: nothing is "
        "downloaded",
    )
    parser.add_argument(
        "--bertscore-layers",
        type=int,
        default=None,
        metavar="N",
        help="hidden layer BERTScore compares (default: bert_score's choice for a "
        "model of the directory's name, e.g. 17 for roberta-large)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    parser.add_argument(
        "--markdown", type=Path, default=None, help="write the Markdown tables here"
    )


def main(args: argparse.Namespace) -> int:
    from hemblip.data import load_dataset, split_samples
    from hemblip.errors import DatasetError, HemblipConfigError
    from hemblip.evaluate import evaluate, render_markdown
    from hemblip.metrics import check_bertscore_model

    if args.limit is not None and args.limit < 1:
        raise HemblipConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise HemblipConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_beams < 1:
        raise HemblipConfigError(f"--num-beams must be >= 1, got {args.num_beams}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise HemblipConfigError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.no_bertscore and (
        args.bertscore_model is not None or args.bertscore_layers is not None
    ):
        raise HemblipConfigError("--no-bertscore contradicts --bertscore-model/--bertscore-layers")
    if args.bertscore_layers is not None and args.bertscore_layers < 1:
        raise HemblipConfigError(f"--bertscore-layers must be >= 1, got {args.bertscore_layers}")
    if args.bertscore_model is not None:
        check_bertscore_model(args.bertscore_model)  # before loading data and captioning
    samples = load_dataset(args.data)
    train = None
    if args.split != "all":
        splits = split_samples(samples, args.val_fraction, args.seed)
        train = splits["train"]
        samples = splits[args.split]
    if args.limit is not None:
        samples = samples[: args.limit]
    if not samples:
        raise DatasetError(f"{args.data}: no cells in split {args.split!r}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise HemblipConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    kwargs = {"batch_size": args.batch_size, "num_beams": args.num_beams, "device": args.device}
    if args.max_new_tokens is not None:
        kwargs["max_new_tokens"] = args.max_new_tokens
    if args.base is not None:
        kwargs["base"] = args.base
    report = evaluate(
        args.model,
        samples,
        kwargs,
        train_samples=train,
        with_bertscore=not args.no_bertscore,
        bertscore_model=args.bertscore_model,
        bertscore_layers=args.bertscore_layers,
    )
    report["data"] = {"spec": str(args.data), "split": args.split}
    markdown = render_markdown(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown)
    print(markdown, end="")
    return 0
