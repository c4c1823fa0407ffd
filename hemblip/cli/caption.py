"""``python -m hemblip caption IMAGE...``: one JSON line per image (caption + parsed attributes)."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "caption white-cell crop images; prints one JSON line per image"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="crop image files (PNG/JPEG/TIFF)")
    parser.add_argument("--model", default=None,
                        help="checkpoint or adapter dir, s3:// URI or hub id (default: the demo checkpoint)")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--decoding", choices=("greedy", "beam"), default="greedy",
                        help="beam = the paper's 4 beams, repetition penalty 1.15, no repeated 3-grams")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--preprocess", choices=("device", "processor"), default="device",
                        help="device = resize/normalise batched on --device (default); processor = "
                             "the checkpoint's PIL image processor, one crop at a time")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pickle (.bin/.pt) weights: only for checkpoints you trust")


def _read(path: str):
    """RGB uint8 (H, W, 3) from an image file; raises OSError/ValueError with the cause."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise OSError("no such file") from None
    except UnidentifiedImageError:
        raise ValueError("not a readable image") from None
    except (OSError, SyntaxError) as exc:  # truncated/corrupt files surface as these in PIL
        raise ValueError(f"cannot decode image ({exc})") from None


def main(args: argparse.Namespace) -> int:
    from hemblip.inference import Captioner
    from hemblip.ontology import ATTRIBUTE_NAMES

    good, crops, failed = [], [], 0
    for path in args.images:
        try:
            crops.append(_read(path))
            good.append(path)
        except (OSError, ValueError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            failed += 1
    if crops:
        captioner = Captioner(args.model, device=args.device, batch_size=args.batch_size,
                              decoding=args.decoding, max_new_tokens=args.max_new_tokens,
                              allow_pickle=args.allow_pickle,
                              preprocess=getattr(args, "preprocess", "device"))
        for path, res in zip(good, captioner.caption(crops)):
            row = {"image": path, "caption": res.caption, "cell_type": res.cell_type,
                   "case": res.case,
                   "attributes": {name: res.attributes.get(name) for name in ATTRIBUTE_NAMES},
                   "mean_logprob": round(res.mean_logprob, 4),
                   "model_version": captioner.model_version}
            print(json.dumps(row), flush=True)
    return 1 if failed else 0
