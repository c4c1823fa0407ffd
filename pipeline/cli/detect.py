"""``python -m pipeline detect PATH... --out cells.parquet``: find, crop and measure white cells.

One Parquet row per cell (schema ``pipeline.schema.DETECT_SCHEMA``), one summary line per slide
on stdout; a file that cannot be used gets one ``error: <path>: <cause>`` line on stderr, the
others are still processed, and the exit code is 1 if any failed.

``--zones ZONE[,ZONE]`` reads whole smears as the job's zoned slides are read
(:func:`pipeline.detect.detect_slide` with ``zones=True``): each file is zoned at ~4 µm/px first
and only the chosen zones' cells are described, level 0 read only there; the rows add the
:data:`pipeline.schema.ZONE_CELL_COLUMNS` (``smear_zone``, ``rbc_density``) and the summary line
says how many cells were seen outside the chosen zones and whether candidates were found on a
coarse level (``--candidate-mpp``, coarse-to-fine) or in one stage.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from pipeline.errors import ConfigError, PipelineError
from pipeline.schema import QC_FLAGS

HELP = "detect, crop and measure white blood cells in slides/images; write one Parquet row per cell"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="slide or image files")
    parser.add_argument("--out", required=True, type=Path, help="output Parquet file (cells)")
    parser.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="level-0 µm/px for files without one in their metadata",
    )
    parser.add_argument(
        "--crops-dir", type=Path, default=None, help="also write each crop as PNG here"
    )
    parser.add_argument(
        "--crop-um", type=float, default=36.0, help="side of the square crop in µm (default 36)"
    )
    parser.add_argument(
        "--crop-px", type=int, default=224, help="side the crop is resampled to in px (default 224)"
    )
    parser.add_argument(
        "--max-detect-mpp",
        type=float,
        default=None,
        metavar="UM_PER_PX",
        help="detect on the coarsest pyramid level whose µm/px is at most this (≥ 0.5), else "
        "level 0; e.g. 1.1 reads a 40x slide's 1.0 µm/px level: ~1/16 of the pixels, recall "
        "0.962-0.964 on JPEG q80 levels against 0.974-0.983 (default: the level closest to 0.5 µm/px)",
    )
    parser.add_argument(
        "--zones",
        action="append",
        default=None,
        metavar="ZONE[,ZONE]",
        help="zone each file at ~4 µm/px first (a whole smear: glass, thick, monolayer, "
        "feathered) and describe only these zones' cells, reading level 0 only there; rows add "
        "smear_zone and rbc_density (comma-separated or repeated; default: the whole file, no "
        "zone map)",
    )
    parser.add_argument(
        "--candidate-mpp",
        type=_mpp_or_none,
        default=1.1,
        metavar="UM_PER_PX|none",
        help="with --zones: find candidate white cells on the coarsest pyramid level at most this "
        "coarse (a 40x scan's 1.0 µm/px level) and read level 0 only in the windows their crops "
        "need (coarse-to-fine); none: one stage over the zones on the detection level; the whole "
        "file is always read in one stage (default 1.1)",
    )
    parser.add_argument(
        "--max-decode-mb",
        type=float,
        default=None,
        metavar="MIB",
        help="memory budget of any one decode, checked from the file's header before decoding: a "
        "plain image decoded whole, one slide tile, one read; larger files fail with a one-line "
        "error (decompression-bomb guard; default 1024)",
    )


def _mpp_or_none(text: str) -> float | None:
    from pipeline.cli.run import _number

    if text.strip().lower() == "none":
        return None
    try:
        # the run flag's parser: float() would also take "1_1" (11.0), "nan" and other scripts' digits
        return _number(text.strip())
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"not a number of µm/px or none: {text[:40]!r}") from None


def _zones(given: list[str] | None) -> tuple[str, ...] | None:
    """``--zones`` as zone names (lower case, each once), or None (the whole file)."""
    from pipeline.zones import ZONE_NAMES

    if not given:
        return None
    names = tuple(dict.fromkeys(z.strip().lower() for g in given for z in g.split(",")))
    names = tuple(z for z in names if z)
    bad = [z for z in names if z not in ZONE_NAMES]
    if bad or not names:
        raise ConfigError(
            f"--zones {','.join(given)[:60]!r}: give one or more of {', '.join(ZONE_NAMES)}"
        )
    return names


def main(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.detect import DetectConfig, detect_slide
    from pipeline.detection import DetectorConfig
    from pipeline.schema import DETECT_COLUMNS, DETECT_SCHEMA, ZONE_CELL_COLUMNS, schema_of

    extra = {} if args.max_decode_mb is None else {"max_decode_mb": args.max_decode_mb}
    cfg = DetectConfig(
        crop_um=args.crop_um,
        crop_px=args.crop_px,
        mpp=args.mpp,
        detector=DetectorConfig(max_detect_mpp=args.max_detect_mpp),
        candidate_mpp=args.candidate_mpp,
        **extra,
    )
    select = _zones(args.zones)
    zoned = {} if select is None else {"zones": True, "select": select}
    if args.out.exists() and args.out.is_dir():
        raise ConfigError(f"--out: {args.out} is a directory; give a .parquet file path")
    rows: list[dict] = []
    failed = 0
    used_dirs: set[str] = set()
    for path in args.paths:
        try:
            res = detect_slide(path, cfg, source=path, **zoned)
            if args.crops_dir is not None:
                _write_crops(args.crops_dir, path, res.crops, used_dirs)
        except PipelineError as exc:
            failed += 1
            print(f"error: {exc}", file=sys.stderr, flush=True)
            continue
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
            failed += 1
            why = " ".join(str(exc).split()) or "no message"
            print(
                f"error: {path}: unexpected {type(exc).__name__}: {why}",
                file=sys.stderr,
                flush=True,
            )
            continue
        if select is None:
            rows.extend(res.records)
        else:
            # the zone columns: ZONE_CELL_COLUMNS' names from SlideCells.cell_zones
            rows.extend(
                {**r, "smear_zone": z["smear_zone"], "rbc_density": z["rbc_coverage"]}
                for r, z in zip(res.records, res.cell_zones, strict=True)
            )
        print(_summary(path, res), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    schema = DETECT_SCHEMA if select is None else schema_of(DETECT_COLUMNS + ZONE_CELL_COLUMNS)
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, args.out)
    n = len(args.paths)
    print(f"{len(rows)} cells from {n - failed} of {n} files -> {args.out}", flush=True)
    return 1 if failed else 0


def _summary(path: str, res) -> str:
    info = res.info
    flags = Counter(f for r in res.records for f in r["qc_flags"])
    flag_txt = ", ".join(f"{f}={flags[f]}" for f in QC_FLAGS if flags[f]) or "none"
    line = (
        f"{path}: {len(res.records)} cells; mpp {info['mpp']:.4f} ({info['mpp_source']}); "
        f"{info['format']} {info['width']}x{info['height']}, detected on level "
        f"{info['detect_level']}/{info['level_count'] - 1}; flags: {flag_txt}"
    )
    if "zones" not in info:
        return line
    outside = sum((info.get("cells_outside_zones") or {}).values())
    cl = info.get("candidate_level")
    n = info["region_tasks"]
    stages = (
        "no region to read"
        if not n
        else "one stage"
        if cl is None
        else f"candidates on level {cl} ({info.get('candidates') or 0} found, "
        f"{info.get('verify_windows') or 0} level-{info['detect_level']} windows verified)"
    )
    return (
        f"{line}; zones {','.join(info['select'])}: {outside} cell{'s' * (outside != 1)} seen "
        f"outside, {n} region task{'s' * (n != 1)}, {stages}"
    )


def _write_crops(root: Path, path: str, crops, used: set[str]) -> None:
    from PIL import Image

    stem = Path(path).stem or "slide"
    name, k = stem, 1
    while name in used:  # two inputs with the same stem keep separate folders
        k += 1
        name = f"{stem}-{k}"
    used.add(name)
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(d / f"cell_{i:05d}.png", optimize=False)
