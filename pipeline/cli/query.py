"""``python -m pipeline query "SQL" --output LOCATION``: read-only SQL over cells/slides/runs."""

from __future__ import annotations

import argparse
import io
import json
import sys
from datetime import date, datetime

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import ConfigError

HELP = "run a read-only SQL query (DuckDB) over the output views cells, slides, runs"

_MAX_CELL = 60


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sql",
        help="one SELECT statement; views: cells, slides, runs (column run_date from the partition)",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="LOCATION",
        help="output location of the nightly job: a directory or s3://bucket/prefix",
    )
    parser.add_argument(
        "--format",
        default="table",
        choices=("table", "csv", "json", "parquet"),
        help="result format (default: table)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="write the result to FILE instead of stdout (required for parquet)",
    )
    parser.add_argument(
        "--s3-endpoint", metavar="URL", help="S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS)"
    )


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        value = ",".join(_cell(v) for v in value)
    s = str(value).replace("\n", " ")
    return s if len(s) <= _MAX_CELL else s[: _MAX_CELL - 1] + "…"


def format_table(table: pa.Table) -> str:
    """Plain aligned text: one header line, one line per row, then the row count."""
    rows = [[_cell(v) for v in row.values()] for row in table.to_pylist()]
    header = table.column_names
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(lines) + "\n"


def _json_default(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return None  # binary (thumbnails) is not meaningful in JSON; select it explicitly as base64 if needed
    raise TypeError(type(value).__name__)


def main(args: argparse.Namespace) -> int:
    from pipeline.query import query_arrow

    if args.format == "parquet" and not args.out:
        raise ConfigError("--format parquet needs --out FILE")
    table = query_arrow(args.output, args.sql, s3_endpoint=args.s3_endpoint)
    if args.format == "parquet":
        pq.write_table(table, args.out)
        print(f"wrote {table.num_rows} rows to {args.out}", file=sys.stderr)
        return 0
    if args.format == "csv":
        # CSV cannot hold list or binary columns: lists become JSON text, binary is dropped.
        cols, names = [], []
        for name, col in zip(table.column_names, table.columns):
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                col = pa.array(
                    [None if v is None else json.dumps(v) for v in col.to_pylist()], pa.string()
                )
            elif pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
                continue
            cols.append(col)
            names.append(name)
        buf = io.BytesIO()
        pacsv.write_csv(pa.table(cols, names=names), buf)
        text = buf.getvalue().decode()
    elif args.format == "json":
        text = "\n".join(
            json.dumps(r, default=_json_default, ensure_ascii=False) for r in table.to_pylist()
        )
        text += "\n" if text else ""
    else:
        text = format_table(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {table.num_rows} rows to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
