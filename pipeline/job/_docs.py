"""Render the output-column tables of README.md ("Outputs") from :mod:`pipeline.schema`.

    python -m pipeline.job._docs            # prints the tables (markdown)

A unit test checks that the README holds exactly these tables.
"""

from __future__ import annotations

import pyarrow as pa

from pipeline.schema import CELL_COLUMNS, RUN_COLUMNS, SLIDE_COLUMNS


def _type(t: pa.DataType) -> str:
    return (
        str(t)
        .replace("timestamp[us, tz=UTC]", "timestamp (µs, UTC)")
        .replace("list<item: string>", "list<string>")
    )


def table_markdown(columns) -> str:
    lines = ["| column | type | unit | description |", "|---|---|---|---|"]
    for name, typ, unit, desc in columns:
        lines.append(f"| `{name}` | {_type(typ)} | {unit} | {desc.replace('|', '/')} |")
    return "\n".join(lines)


def render() -> str:
    parts = []
    for title, cols in (
        ("cells/", CELL_COLUMNS),
        ("slides/", SLIDE_COLUMNS),
        ("runs/", RUN_COLUMNS),
    ):
        parts.append(
            f"#### `{title}` ({len(cols)} columns + `run_date` partition)\n\n{table_markdown(cols)}"
        )
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    print(render(), end="")
