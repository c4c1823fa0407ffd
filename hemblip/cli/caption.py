"""``python -m hemblip caption IMAGE...``: one JSON line per image (caption + parsed attributes).

Framing: by default every image is captioned as given (resized whole to the model's input), and
each output row says so (``"framing": "as-given"``). The job frames cells differently: a square of
``JOB_CROP_UM`` µm around each cell it detects. An image that is clearly not one cell's crop
(see :func:`field_problem`) is therefore refused, with a one-line error naming the file, unless
``--framing as-given`` is passed; finding the cells of a field is ``python -m pipeline detect``'s
job (hemblip does not depend on the pipeline package, so it cannot do that itself).

``--framing cell --center X,Y`` captions the cell centred at (X, Y) px of the image exactly as the
job does: :func:`hemblip.crops.cell_crop` (the job's own crop function) at the image's scale
(TIFF resolution tags, else ``--mpp``, else the red-cell estimate of the image, the job's rule and
estimator), white past the image border as the job reads outside a slide (``--pad``). Given the
centroid the job reports for a cell, the crop and the caption are the job's.
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
_FALLBACK_MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS, if a caller disabled it
_PIL_LOCK = threading.Lock()  # Image.MAX_IMAGE_PIXELS is process-wide; lifted only while opening

_DETECT_HINT = (
    "run `python -m pipeline detect IMAGE --out cells.parquet --crops-dir CROPS` (or the "
    "job) to crop each detected cell as the job does, then caption the crops"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="single-cell crop images (PNG/JPEG/TIFF), each captioned as given",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint or adapter dir, s3:// URI or hub id (default: the demo checkpoint)",
    )
    parser.add_argument(
        "--base",
        default=None,
        metavar="DIR|URI",
        help="for a LoRA adapter --model: the base model to use instead of the one "
        "the adapter names (e.g. a local copy of Salesforce/blip-image-captioning-base)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--decoding",
        choices=("greedy", "beam"),
        default="greedy",
        help="beam = the paper's 4 beams, repetition penalty 1.15, no repeated 3-grams",
    )
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument(
        "--preprocess",
        choices=("device", "processor"),
        default="device",
        help="device = resize/normalise batched on --device (default); processor = "
        "the checkpoint's PIL image processor, one crop at a time",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle (.bin/.pt) weights: only for checkpoints you trust",
    )
    parser.add_argument(
        "--framing",
        choices=("auto", "as-given", "cell", "detect"),
        default="auto",
        help="auto (default): caption crop-sized images as given and refuse whole "
        f"fields (both sides > {FIELD_FACTOR:g} x the job's {JOB_CROP_UM:g} µm "
        f"crop at a known scale, else > {FIELD_FACTOR:g} x max(model input, "
        f"{JOB_CROP_PX} px)); as-given: caption every image as given, whole; "
        "cell: the job's crop around each --center (the job's crop function, "
        "scale and resampling); detect: not done here (hemblip has no "
        "detector): use `python -m pipeline detect --crops-dir` and caption the crops",
    )
    parser.add_argument(
        "--mpp",
        type=float,
        default=None,
        metavar="UM_PER_PX",
        help="µm/px of images without a scale in their TIFF resolution tags (the "
        "tags win, as in the job); tells crops from fields, and with "
        "--framing cell sizes the crop (default there: the red-cell estimate)",
    )
    parser.add_argument(
        "--center",
        action="append",
        default=None,
        metavar="X,Y",
        help="with --framing cell: a cell's centre in px of the image (e.g. the "
        "job's centroid_x,centroid_y); repeat for several cells",
    )
    parser.add_argument(
        "--crop-um",
        type=float,
        default=JOB_CROP_UM,
        help=f"with --framing cell: crop side in µm (default {JOB_CROP_UM:g}, the job's)",
    )
    parser.add_argument(
        "--crop-px",
        type=int,
        default=JOB_CROP_PX,
        help=f"with --framing cell: px the crop is resampled to (default {JOB_CROP_PX}, the job's)",
    )
    parser.add_argument(
        "--pad",
        choices=("white", "reflect"),
        default="white",
        help="with --framing cell: fill past the image border: white (default, as the "
        "job reads outside a slide) or reflect (mirror, as the training crops)",
    )
    parser.add_argument(
        "--crops-dir",
        default=None,
        metavar="DIR",
        help="also write each captioned crop, as the model got it before its own "
        "resize, to DIR/crop_NNNNN.png (lossless; the row's crop_file)",
    )


def _show(value: object) -> str:
    """A file name as text safe on one line (control characters escaped)."""
    s = str(value)
    return s if s.isprintable() else repr(s)


def _max_pixels() -> int:
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or _FALLBACK_MAX_PIXELS)


def _tiff_mpp(im) -> float | None:
    """µm/px from TIFF resolution tags (inch or cm units) when plausible, else None."""
    from hemblip.scale import tiff_resolution_mpp

    return tiff_resolution_mpp(im)


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
        raise ValueError(
            f"declared dimensions {w}x{h} ({w * h} px) exceed the {limit} px limit for "
            "an image decoded whole (decompression bomb?)"
        )
    return w, h, mpp


def _read(path: str, as_slide: bool = False):
    """RGB uint8 (H, W, 3) from an image file; raises OSError/ValueError with the cause.

    ``as_slide``: the pixels the job reads from a plain image (alpha composited on white, EXIF
    orientation applied), for ``--framing cell``.
    """
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the size was checked by _header
            with Image.open(path) as im:
                im.load()
                if not as_slide:
                    return np.asarray(im.convert("RGB"))
                im2 = ImageOps.exif_transpose(im)
                if im2.mode in ("RGBA", "LA", "PA") or (
                    im2.mode == "P" and "transparency" in im2.info
                ):
                    rgba = im2.convert("RGBA")
                    im2 = Image.alpha_composite(
                        Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba
                    )
                return np.asarray(im2.convert("RGB"))
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
    sides = [
        v
        for v in (get(k) for k in ("height", "width", "shortest_edge"))
        if isinstance(v, int) and not isinstance(v, bool) and v > 0
    ]
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
            return (
                f"{width}x{height} px at {mpp:g} µm/px is {width * mpp:.0f}x{height * mpp:.0f} µm, "
                f"more than {limit_um:g} µm in both sides ({FIELD_FACTOR:g} x the job's "
                f"{JOB_CROP_UM:g} µm crop)"
            )
        return None
    limit_px = int(FIELD_FACTOR * max(model_px, JOB_CROP_PX))
    if min(width, height) > limit_px:
        return (
            f"{width}x{height} px, more than {limit_px} px in both sides ({FIELD_FACTOR:g} x "
            f"max(model input {model_px} px, job crop {JOB_CROP_PX} px); no scale known: "
            "no TIFF resolution tags, no --mpp)"
        )
    return None


def _check_settings(args: argparse.Namespace) -> None:
    from hemblip.errors import HemblipConfigError

    if args.framing == "detect":
        raise HemblipConfigError(f"--framing detect: hemblip does not detect cells; {_DETECT_HINT}")
    mpp = args.mpp
    if mpp is not None and not (math.isfinite(mpp) and _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]):
        raise HemblipConfigError(
            f"--mpp must be a scale in µm/px within [{_MPP_RANGE[0]:g}, "
            f"{_MPP_RANGE[1]:g}], got {mpp!r}"
        )
    centers = getattr(args, "center", None)
    if args.framing == "cell":
        if not centers:
            raise HemblipConfigError(
                "--framing cell needs --center X,Y (the cell's centre in px of the "
                f"image, e.g. the job's centroid_x,centroid_y); for a whole field {_DETECT_HINT}"
            )
        args.center = [_parse_center(c) for c in centers]
        cu, cp = getattr(args, "crop_um", JOB_CROP_UM), getattr(args, "crop_px", JOB_CROP_PX)
        if not (isinstance(cu, float | int) and math.isfinite(cu) and 0 < cu <= 500):
            raise HemblipConfigError(f"--crop-um must be a number of µm in (0, 500], got {cu!r}")
        if not (isinstance(cp, int) and 16 <= cp <= 4096):
            raise HemblipConfigError(f"--crop-px must be an integer in [16, 4096], got {cp!r}")
    elif centers:
        raise HemblipConfigError("--center is used only with --framing cell")


def _parse_center(text: str) -> tuple[float, float]:
    from hemblip.errors import HemblipConfigError

    parts = str(text).split(",")
    try:
        x, y = (float(p) for p in parts)
    except ValueError:
        x = y = math.nan
    if not (math.isfinite(x) and math.isfinite(y) and abs(x) < 1e9 and abs(y) < 1e9):
        raise HemblipConfigError(
            f"--center must be X,Y: two finite numbers of px, got {_show(text)}"
        )
    return x, y


def _cell_crops(
    path: str, args: argparse.Namespace, meta_mpp: float | None
) -> list[tuple[dict, object]]:
    """``[(row fields, crop)]`` for each ``--center`` of ``path``, cut as the job cuts them."""
    from hemblip.crops import cell_crop, crop_box
    from hemblip.errors import HemblipError
    from hemblip.scale import estimate_image_mpp

    rgb = _read(path, as_slide=True)
    h, w = rgb.shape[:2]
    # the job's order: the file's resolution tags, else the user's mpp, else the red cells
    if meta_mpp is not None:
        mpp, source = meta_mpp, "metadata"
    elif args.mpp is not None:
        mpp, source = float(args.mpp), "user"
    else:
        mpp = (
            estimate_image_mpp(lambda b: rgb[b[1] : b[3], b[0] : b[2]], w, h)
            if min(w, h) >= 2
            else None
        )
        if mpp is None:
            raise ValueError(
                "no mpp in the TIFF tags, none given (--mpp), and too few red cells to "
                "estimate it from"
            )
        source = "estimated"
    out = []
    for cx, cy in args.center:
        try:
            box = crop_box((cx, cy), mpp, args.crop_um)
            crop = cell_crop(
                rgb, (cx, cy), mpp, crop_um=args.crop_um, crop_px=args.crop_px, pad=args.pad
            )
        except HemblipError as exc:
            raise ValueError(str(exc)) from None
        incomplete = box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h
        out.append(
            (
                {
                    "center": [cx, cy],
                    "mpp": mpp,
                    "mpp_source": source,
                    "crop_um": float(args.crop_um),
                    "crop_incomplete": incomplete,
                },
                crop,
            )
        )
    return out


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
    good, crops, extra = [], [], []
    if heads:
        captioner = Captioner(
            args.model,
            device=args.device,
            batch_size=args.batch_size,
            decoding=args.decoding,
            max_new_tokens=args.max_new_tokens,
            allow_pickle=args.allow_pickle,
            base=args.base,
            preprocess=getattr(args, "preprocess", "device"),
        )
        model_px = model_input_px(captioner.image_processor)
        for i, (w, h, mpp) in heads.items():
            path = args.images[i]
            why = field_problem(w, h, mpp, model_px) if framing == "auto" else None
            if why is not None:
                problems[i] = (
                    f"{_show(path)}: looks like a whole field, not one cell's crop ({why}); "
                    f"pass --framing as-given to caption it as given, or {_DETECT_HINT}"
                )
                continue
            try:
                if framing == "cell":
                    meta = _header(path)[2]
                    for fields, crop in _cell_crops(path, args, meta):
                        crops.append(crop)
                        good.append(path)
                        extra.append(fields)
                else:
                    crops.append(_read(path))
                    good.append(path)
                    extra.append({})
            except (OSError, ValueError) as exc:
                problems[i] = f"{_show(path)}: {exc}"
    for i in sorted(problems):
        print(problems[i], file=sys.stderr)
    if crops and framing == "as-given":
        side = model_input_px(captioner.image_processor)
        print(
            f"note: --framing as-given: each image is captioned as given (resized whole to the "
            f"model's {side}x{side} px input), not as the job's {JOB_CROP_UM:g} µm crop around a "
            "detected cell",
            file=sys.stderr,
        )
    if crops:
        shown = "cell" if framing == "cell" else "as-given"
        crops_dir = getattr(args, "crops_dir", None)
        if crops_dir:
            from pathlib import Path

            from PIL import Image

            Path(crops_dir).mkdir(parents=True, exist_ok=True)
            for n, (crop, fields) in enumerate(zip(crops, extra)):
                # numbered names: an input file name is not trusted as an output path
                fields["crop_file"] = str(Path(crops_dir) / f"crop_{n:05d}.png")
                Image.fromarray(crop).save(fields["crop_file"])
        for path, fields, res in zip(good, extra, captioner.caption(crops)):
            row = {
                "image": path,
                "framing": shown,
                **fields,
                "caption": res.caption,
                "cell_type": res.cell_type,
                "case": res.case,
                "attributes": {name: res.attributes.get(name) for name in ATTRIBUTE_NAMES},
                "mean_logprob": round(res.mean_logprob, 4),
                "model_version": captioner.model_version,
            }
            print(json.dumps(row), flush=True)
    return 1 if problems else 0
