"""``python -m pipeline make-samples OUT_DIR``: write the bundled sample slides (pyramidal TIFF and
SVS built from real BCCD smear fields) and their ground-truth WBC boxes.

``--whole-smear``: instead, one seeded whole-smear slide (:mod:`pipeline.whole_smear`: glass,
thick end, monolayer, feathered edge, from real TXL-PBC fields in ``--data-dir``) with its truth
(``<name>.truth.json``: every white cell's box and type where known; ``<name>.zones.npz`` and
``.zones.png``: the zone map).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write the sample slides (generic TIFF + Aperio SVS pyramids) with ground-truth WBC boxes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "out_dir", type=Path, metavar="OUT_DIR", help="folder to write into (created)"
    )
    ws = parser.add_argument_group("whole-smear slide (with --whole-smear)")
    ws.add_argument(
        "--whole-smear",
        action="store_true",
        help="write one seeded whole-smear slide with its truth instead of the sample slides",
    )
    ws.add_argument("--width-mm", type=float, default=8.0, help="scanned width, mm (default 8)")
    ws.add_argument("--height-mm", type=float, default=4.0, help="scanned height, mm (default 4)")
    ws.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px (default 0.25)")
    ws.add_argument(
        "--monolayer", type=float, default=0.3, help="share of the area in monolayer (0.3)"
    )
    ws.add_argument("--thick", type=float, default=0.15, help="share in the thick end (0.15)")
    ws.add_argument(
        "--feathered", type=float, default=0.1, help="share in the feathered edge (0.1)"
    )
    ws.add_argument(
        "--source",
        default="auto",
        help="TXL-PBC source of the cells: pbc, raabin, kaggle, bccd or auto (by seed)",
    )
    ws.add_argument("--seed", type=int, default=0, help="seed (same seed, same slide)")
    ws.add_argument(
        "--format", dest="fmt", default="svs", help="svs (Aperio) or tiff (generic BigTIFF)"
    )
    ws.add_argument(
        "--wbc-per-mm2", type=float, default=40.0, help="white cells per mm² of monolayer"
    )
    ws.add_argument("--gaps", type=int, default=2, help="glass gaps inside the smear (2)")
    ws.add_argument("--name", default=None, help="file stem (default smear_<seed>)")
    ws.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder holding txl_pbc/ and bccd/ (default /work/shared/data)",
    )


def main(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError

    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise ConfigError(f"OUT_DIR: {args.out_dir} exists and is not a folder")
    if args.whole_smear:
        return _whole_smear(args)
    from pipeline.samples import build_sample_slides

    for s in build_sample_slides(args.out_dir):
        print(f"{s.path}  {s.format}  {s.n_wbc} WBCs  truth: {s.truth_path}")
    return 0


def _whole_smear(args: argparse.Namespace) -> int:
    from pipeline.whole_smear import (
        DEFAULT_DATA_DIR,
        SmearSpec,
        build_whole_smear,
        smear_gigapixels,
    )

    spec = SmearSpec(
        width_mm=args.width_mm,
        height_mm=args.height_mm,
        mpp=args.mpp,
        monolayer_fraction=args.monolayer,
        thick_fraction=args.thick,
        feathered_fraction=args.feathered,
        source=args.source,
        seed=args.seed,
        fmt=args.fmt,
        wbc_per_mm2=args.wbc_per_mm2,
        n_gaps=args.gaps,
    )
    sm = build_whole_smear(
        args.out_dir, spec, name=args.name, data_dir=args.data_dir or DEFAULT_DATA_DIR
    )
    areas = ", ".join(f"{k} {v:.2f}" for k, v in sm.areas_mm2.items())
    print(
        f"{sm.path}  {sm.format}  {sm.width}x{sm.height} px ({smear_gigapixels(spec):.2f} GP)  "
        f"{sm.n_wbc} WBCs  zones mm²: {areas}  truth: {sm.truth_path}  {sm.seconds:.1f} s"
    )
    return 0
