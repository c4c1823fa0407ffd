"""``python -m hemblip caption IMAGE...``: one JSON line per image (caption + parsed attributes).

Framing: every image is captioned as given (resized whole to the model's input), and each output
row says so (``"framing": "as-given"``). The job frames cells differently: a square of
``JOB_CROP_UM`` µm around each cell it detects. An image that is clearly not one cell's crop
(see :func:`field_problem`) is therefore refused, with a one-line error naming the file, unless
``--framing as-given`` is passed; finding the cells of a field is ``python -m pipeline detect``'s
job (hemblip does not depend on the pipeline package, so it cannot do that itself).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import warnings

HELP = "caption white-cell crop images; prints one JSON line per image"

#: The job's default crop: side in µm and the px it is resampled to (``pipeline.detect.DetectConfig``).
JOB_CROP_UM = 36.0
JOB_CROP_PX = 224
#: An image is a whole field when both its sides exceed this many times the reference crop side.
FIELD_FACTOR = 2.0
_MPP_RANGE = (0.01, 50.0)  # µm/px a microscope image can plausibly have (as the pipeline's readers)
_RES_UNIT_UM = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: inch, centimetre -> µm
_FALLBACK_MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS, if a caller disabled it
_PIL_LOCK = threading.Lock()  # Image.MAX_IMAGE_PIXELS is process-wide; lifted only while opening

_DETECT_HINT = ("run `python -m pipeline detect IMAGE --out cells.parquet --crops-dir CROPS` (or the "
                "job) to crop each detected cell as the job does, then caption the crops")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="single-cell crop images (PNG/JPEG/TIFF), each captioned as given")
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
    parser.add_argument("--framing", choices=("auto", "as-given", "detect"), default="auto",
                        help="auto (default): caption crop-sized images as given and refuse whole "
                             f"fields (both sides > {FIELD_FACTOR:g} x the job's {JOB_CROP_UM:g} µm "
                             f"crop at a known scale, else > {FIELD_FACTOR:g} x max(model input, "
                             f"{JOB_CROP_PX} px)); as-given: caption every image as given, whole; "
                             "detect: not done here (hemblip has no detector): use "
                             "`python -m pipeline detect --crops-dir` and caption the crops")
    parser.add_argument("--mpp", type=float, default=None, metavar="UM_PER_PX",
                        help="µm/px of images without a scale in their TIFF resolution tags (the "
                             "tags win, as in the job); used only to tell crops from fields")


def _show(value: object) -> str:
    """A file name as text safe on one line (control characters escaped)."""
    s = str(value)
    return s if s.isprintable() else repr(s)


def _max_pixels() -> int:
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or _FALLBACK_MAX_PIXELS)


def _tiff_mpp(im) -> float | None:
    """µm/px from TIFF resolution tags (inch or cm units) when plausible, else None."""
    tags = getattr(im, "tag_v2", None)
    if not tags:
        return None
    try:
        unit = int(tags.get(296, 2))  # ResolutionUnit; the TIFF default is inch
        xres = float(tags.get(282, 0) or 0)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if unit not in _RES_UNIT_UM or not math.isfinite(xres) or xres <= 0:
        return None
    mpp = _RES_UNIT_UM[unit] / xres
    return mpp if _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1] else None


def _header(path: str) -> tuple[int, int, float | None]:
    """``(width, height, µm/px or None)`` from the file's header, decoding no pixels.

    Raises OSError/ValueError with the cause (a declared size over the decode limit included).
    """
    from PIL import Image, UnidentifiedImageError

    limit = _max_pixels()
    try:
        # Pillow's own size check would hide the declared size; the limit is applied below.
        with _PIL_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                with Image.open(path) as im:
                    w, h = im.size
                    mpp = _tiff_mpp(im)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except FileNotFoundError:
        raise OSError("no such file") from None
    except IsADirectoryError:
        raise OSError("is a directory") from None
    except UnidentifiedImageError:
        raise ValueError("not a readable image") from None
    except (OSError, SyntaxError, ValueError) as exc:  # corrupt headers surface as these in PIL
        raise ValueError(f"cannot read the image header ({' '.join(str(exc).split())})") from None
    if w * h > limit:
        raise ValueError(f"declared dimensions {w}x{h} ({w * h} px) exceed the {limit} px limit for "
                         "an image decoded whole (decompression bomb?)")
    return w, h, mpp


def _read(path: str):
    """RGB uint8 (H, W, 3) from an image file; raises OSError/ValueError with the cause."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the size was checked by _header
            with Image.open(path) as im:
                im.load()
                return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise OSError("no such file") from None
    except Image.DecompressionBombError:
        raise ValueError(f"image exceeds the {_max_pixels()} px decode limit") from None
    except UnidentifiedImageError:
        raise ValueError("not a readable image") from None
    except (OSError, SyntaxError) as exc:  # truncated/corrupt files surface as these in PIL
        raise ValueError(f"cannot decode image ({' '.join(str(exc).split())})") from None


def model_input_px(image_processor) -> int:
    """Side in px of the square the checkpoint's image processor resizes to (384 if unknown)."""
    size = getattr(image_processor, "size", None)
    # transformers 5 keeps it as a SizeDict (attributes), older ones and configs as a dict.
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    sides = [v for v in (get(k) for k in ("height", "width", "shortest_edge"))
             if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    if sides:
        return max(sides)
    return 384  # BLIP-base's input, the family every HemBLIP checkpoint belongs to


def field_problem(width: int, height: int, mpp: float | None, model_px: int) -> str | None:
    """Why a ``width`` x ``height`` px image (``mpp`` µm/px or None) is not a single-cell crop.

    With a scale: both sides over ``FIELD_FACTOR`` x ``JOB_CROP_UM`` µm. Without one: both sides
    over ``FIELD_FACTOR`` x max(``model_px``, ``JOB_CROP_PX``) px (dataset crops run 120-400 px;
    fields from a microscope camera are larger). None when the image may be one cell's crop.
    """
    if mpp is not None:
        limit_um = FIELD_FACTOR * JOB_CROP_UM
        if min(width, height) * mpp > limit_um:
            return (f"{width}x{height} px at {mpp:g} µm/px is {width * mpp:.0f}x{height * mpp:.0f} µm, "
                    f"more than {limit_um:g} µm in both sides ({FIELD_FACTOR:g} x the job's "
                    f"{JOB_CROP_UM:g} µm crop)")
        return None
    limit_px = int(FIELD_FACTOR * max(model_px, JOB_CROP_PX))
    if min(width, height) > limit_px:
        return (f"{width}x{height} px, more than {limit_px} px in both sides ({FIELD_FACTOR:g} x "
                f"max(model input {model_px} px, job crop {JOB_CROP_PX} px); no scale known: "
                "no TIFF resolution tags, no --mpp)")
    return None


def _check_settings(args: argparse.Namespace) -> None:
    from hemblip.errors import HemblipConfigError

    if args.framing == "detect":
        raise HemblipConfigError(f"--framing detect: hemblip does not detect cells; {_DETECT_HINT}")
    mpp = args.mpp
    if mpp is not None and not (math.isfinite(mpp) and _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]):
        raise HemblipConfigError(f"--mpp must be a scale in µm/px within [{_MPP_RANGE[0]:g}, "
                                 f"{_MPP_RANGE[1]:g}], got {mpp!r}")


def main(args: argparse.Namespace) -> int:
    from hemblip.inference import Captioner
    from hemblip.ontology import ATTRIBUTE_NAMES

    _check_settings(args)
    framing = getattr(args, "framing", "auto")
    problems: dict[int, str] = {}  # input index -> one-line reason, printed in input order
    heads: dict[int, tuple[int, int, float | None]] = {}
    for i, path in enumerate(args.images):
        try:
            w, h, mpp = _header(path)
            heads[i] = (w, h, mpp if mpp is not None else args.mpp)
        except (OSError, ValueError) as exc:
            problems[i] = f"{_show(path)}: {exc}"
    captioner = None
    good, crops = [], []
    if heads:
        captioner = Captioner(args.model, device=args.device, batch_size=args.batch_size,
                              decoding=args.decoding, max_new_tokens=args.max_new_tokens,
                              allow_pickle=args.allow_pickle,
                              preprocess=getattr(args, "preprocess", "device"))
        model_px = model_input_px(captioner.image_processor)
        for i, (w, h, mpp) in heads.items():
            path = args.images[i]
            why = field_problem(w, h, mpp, model_px) if framing == "auto" else None
            if why is not None:
                problems[i] = (f"{_show(path)}: looks like a whole field, not one cell's crop ({why}); "
                               f"pass --framing as-given to caption it as given, or {_DETECT_HINT}")
                continue
            try:
                crops.append(_read(path))
                good.append(path)
            except (OSError, ValueError) as exc:
                problems[i] = f"{_show(path)}: {exc}"
    for i in sorted(problems):
        print(problems[i], file=sys.stderr)
    if crops and framing == "as-given":
        side = model_input_px(captioner.image_processor)
        print(f"note: --framing as-given: each image is captioned as given (resized whole to the "
              f"model's {side}x{side} px input), not as the job's {JOB_CROP_UM:g} µm crop around a "
              "detected cell", file=sys.stderr)
    if crops:
        for path, res in zip(good, captioner.caption(crops)):
            row = {"image": path, "framing": "as-given", "caption": res.caption,
                   "cell_type": res.cell_type, "case": res.case,
                   "attributes": {name: res.attributes.get(name) for name in ATTRIBUTE_NAMES},
                   "mean_logprob": round(res.mean_logprob, 4),
                   "model_version": captioner.model_version}
            print(json.dumps(row), flush=True)
    return 1 if problems else 0
