"""``python -m pipeline eval-slides``: end-to-end figures from labelled fields laid out as slides."""

from __future__ import annotations

from pathlib import Path

HELP = (
    "end-to-end evaluation: labelled fields as pyramidal slides -> the real job -> detection P/R, "
    "cell type, attributes, vs the same model on dataset crops"
)

_DEFAULT_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--data",
        default=str(_DEFAULT_DATA.resolve()),
        metavar="DIR",
        help="the shared data folder (txl_pbc/, bccd/; default: ../shared/data)",
    )
    parser.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="val (default; use it for every decision) or test (report once)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N", help="at most N fields per source"
    )
    parser.add_argument(
        "--model", default=None, help="checkpoint for the job and the crops (default: bundled demo)"
    )
    parser.add_argument(
        "--target-mpp",
        type=float,
        default=None,
        metavar="X",
        help="resample the fields to X µm/px before building the slides (e.g. 0.25, a 40x scanner)",
    )
    parser.add_argument(
        "--scale-error",
        type=float,
        default=0.0,
        metavar="E",
        help="write the metadata scale off by the fraction E (e.g. 0.15 or -0.15)",
    )
    parser.add_argument(
        "--jpeg-quality", type=int, default=90, metavar="Q", help="tile JPEG quality (default 90)"
    )
    parser.add_argument(
        "--format",
        dest="slide_format",
        choices=("svs", "tiff", "mixed"),
        default="mixed",
        help="Aperio SVS, generic pyramidal TIFF, or alternating (default)",
    )
    parser.add_argument(
        "--scale",
        choices=("source", "field"),
        default="source",
        help="field scale: the source's median red-cell estimate (default) or the field's own",
    )
    parser.add_argument(
        "--crop-um", type=float, default=36.0, help="the job's crop side, µm (default 36)"
    )
    parser.add_argument(
        "--work",
        metavar="DIR",
        default=None,
        help="keep slides and local output here (default: a temporary folder, removed)",
    )
    parser.add_argument(
        "--s3-endpoint", metavar="URL", default=None, help="S3 endpoint (MinIO, moto, ...)"
    )
    parser.add_argument(
        "--s3-prefix",
        metavar="S3URI",
        default=None,
        help="upload the slides under s3://bucket/prefix/ and run the job on S3 input",
    )
    parser.add_argument(
        "--output",
        metavar="LOCATION",
        default=None,
        help="the job's output (local dir or s3://; default: inside the work folder)",
    )
    parser.add_argument("--no-crops", action="store_true", help="skip the dataset-crop comparison")
    parser.add_argument(
        "--crops-framing",
        choices=("physical", "box"),
        default=None,
        help="dataset crops as hemblip.data.build_demo_dataset cuts them: physical (the "
        "job's 36 µm crop) or box (2.5x the cell box); default: its default",
    )
    parser.add_argument(
        "--caption-batch-size", type=int, default=16, help="the job's caption batch size"
    )
    parser.add_argument(
        "--json", metavar="OUT", help="write the full report (per field, per cell) as JSON"
    )
    parser.add_argument("--verbose", action="store_true", help="print the job's progress lines")


def main(args) -> int:
    import sys

    from pipeline.eval_slides import EvalSettings, evaluate_slides, format_report, write_json

    settings = EvalSettings(
        split=args.split,
        limit=args.limit,
        target_mpp=args.target_mpp,
        scale_error=args.scale_error,
        jpeg_quality=args.jpeg_quality,
        slide_format=args.slide_format,
        scale=args.scale,
        crop_um=args.crop_um,
    )
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if args.verbose else None
    rep = evaluate_slides(
        args.data,
        settings,
        model=args.model,
        work_dir=args.work,
        s3_endpoint=args.s3_endpoint,
        s3_prefix=args.s3_prefix,
        output=args.output,
        crops=not args.no_crops,
        crops_framing=args.crops_framing,
        job_overrides={"caption_batch_size": args.caption_batch_size},
        say=say,
    )
    print(format_report(rep))
    if args.json:
        write_json(rep, args.json)
    return 0 if not rep["failures"] else 1
