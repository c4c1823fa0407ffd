"""Read-only SQL over fixture outputs: views, partitions, README examples, lock-down, CLI formats."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hemblip.ontology import ABNORMAL_CELL_TYPES
from pipeline.__main__ import main as cli
from pipeline.errors import ConfigError
from pipeline.outputs import open_outputs
from pipeline.query import QueryError, query, query_arrow

sys.path.insert(0, str(Path(__file__).parent))
from outputs_fixture import DATE1, DATE2, RUN2, build_outputs  # noqa: E402

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_outputs(tmp_path_factory.mktemp("outputs"))


def _examples() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```sql\n(.*?)```", text, flags=re.S)
    out = {}
    for b in blocks:
        m = re.match(r"-- example: (\w+)\n", b)
        assert m, f"sql block without an example name in {README}: {b[:60]}"
        out[m.group(1)] = b
    return out


def _current(fx) -> list[dict]:
    # the fixture's current cells: slides re-processed never happen in it, so every cell row counts
    return fx.cells


def test_views_partitions_and_only_committed_files(fx):
    out = open_outputs(str(fx.root))
    assert all("/_" not in f and "/." not in f for f in out.cells.files + out.slides.files)
    assert len(out.cells.files) == 2 and len(out.slides.files) == 2 and len(out.runs.files) == 2
    t = query_arrow(
        fx.root.as_posix(), "SELECT run_date, count(*) AS n FROM cells GROUP BY 1 ORDER BY 1"
    )
    assert [str(d) for d in t.column("run_date").to_pylist()] == [DATE1, DATE2]
    per_run = Counter(c["run_id"] for c in fx.cells)
    assert t.column("n").to_pylist() == [per_run["run-20261127-000001"], per_run[RUN2]]
    assert query_arrow(str(fx.root), "SELECT count(*) FROM slides").column(0)[0].as_py() == len(
        fx.slides
    )
    assert query_arrow(str(fx.root), "SELECT count(*) FROM runs").column(0)[0].as_py() == 2


def test_readme_examples_cover_the_issue(fx):
    assert set(_examples()) >= {
        "cells_per_slide",
        "differential_per_slide",
        "abnormal_fraction",
        "attribute_by_cell_type",
        "qc_flagged",
        "current_failures",
    }


def test_example_cells_per_slide(fx):
    rows = query_arrow(str(fx.root), _examples()["cells_per_slide"]).to_pylist()
    expected = Counter(c["slide_uri"] for c in _current(fx))
    assert {r["slide_uri"]: r["cells"] for r in rows} == dict(expected)
    assert len(rows) == 3


def test_example_differential_per_slide(fx):
    rows = query_arrow(str(fx.root), _examples()["differential_per_slide"]).to_pylist()
    expected = Counter((c["slide_uri"], c["cell_type"]) for c in _current(fx) if c["cell_type"])
    assert {(r["slide_uri"], r["cell_type"]): r["n"] for r in rows} == dict(expected)
    typed = Counter(c["slide_uri"] for c in _current(fx) if c["cell_type"])
    for r in rows:
        assert r["percent"] == pytest.approx(round(100 * r["n"] / typed[r["slide_uri"]], 1))
    aml = [r for r in rows if r["slide_uri"].endswith("aml-01.svs")]
    assert aml[0]["cell_type"] == "myeloblast" and aml[0]["n"] == 10


def test_example_abnormal_fraction(fx):
    sql = _examples()["abnormal_fraction"]
    listed = re.search(r"cell_type IN \((.*?)\)\)", sql, flags=re.S).group(1)
    assert tuple(re.findall(r"'([^']+)'", listed)) == ABNORMAL_CELL_TYPES
    rows = query_arrow(str(fx.root), sql).to_pylist()
    fractions = {}
    for uri in {c["slide_uri"] for c in _current(fx)}:
        typed = [c for c in _current(fx) if c["slide_uri"] == uri and c["cell_type"]]
        fractions[uri] = sum(c["cell_type"] in ABNORMAL_CELL_TYPES for c in typed) / len(typed)
    expected = sorted(((u, f) for u, f in fractions.items() if f > 0.10), key=lambda x: -x[1])
    assert [r["slide_uri"] for r in rows] == [u for u, _ in expected]
    assert [r["fraction"] for r in rows] == pytest.approx([round(f, 3) for _, f in expected])
    assert [r["slide_uri"].rsplit("/", 1)[1] for r in rows] == [
        "aml-01.svs",
        "cll-01.svs",
    ]  # 45%, 14%


def test_example_attribute_by_cell_type(fx):
    rows = query_arrow(str(fx.root), _examples()["attribute_by_cell_type"]).to_pylist()
    expected = Counter(
        (c["cell_type"], c["nucleus_shape"])
        for c in _current(fx)
        if c["cell_type"] and c["nucleus_shape"]
    )
    assert {(r["cell_type"], r["nucleus_shape"]): r["n"] for r in rows} == dict(expected)
    assert len(rows) > 3


def test_example_qc_flagged(fx):
    rows = query_arrow(str(fx.root), _examples()["qc_flagged"]).to_pylist()
    expected = Counter((c["slide_uri"], f) for c in _current(fx) for f in c["qc_flags"])
    assert {(r["slide_uri"], r["flag"]): r["cells"] for r in rows} == dict(expected)
    assert sum(r["cells"] for r in rows) > 0


def test_example_current_failures(fx):
    """Slides whose latest non-skipped outcome is a failure (tests/test_current_outcomes.py: after a
    run that skipped everything, and after the slide is fixed)."""
    rows = query_arrow(str(fx.root), _examples()["current_failures"]).to_pylist()
    latest: dict[str, dict] = {}
    for s in sorted(
        (s for s in fx.slides if s["status"] != "skipped"), key=lambda s: s["finished_at"]
    ):
        latest[s["slide_uri"]] = s
    expected = sorted(
        (s["slide_uri"], s["reason"], s["run_id"])
        for s in latest.values()
        if s["status"] == "failed"
    )
    assert [(r["slide_uri"], r["reason"], r["run_id"]) for r in rows] == expected
    assert (
        len(rows) == 2
        and "SlideReadError" in rows[1]["reason"]
        and rows[0]["slide_uri"].endswith("broken-01.svs")
    )


def test_example_inconsistent_per_slide(fx):
    rows = query_arrow(str(fx.root), _examples()["inconsistent_per_slide"]).to_pylist()
    for r in rows:
        mine = [c for c in _current(fx) if c["slide_uri"] == r["slide_uri"]]
        assert r["disagree"] == sum(c["consistent"] is False for c in mine)
        assert r["checked"] == sum(c["consistent"] is not None for c in mine)


def test_current_cells_picks_latest_ok_run(tmp_path):
    """A slide processed twice (new model) is counted once, from its latest ok run."""
    fx = build_outputs(tmp_path)
    # re-commit aml-01's cells under run 2 as if re-processed, with one cell fewer
    aml = [
        dict(c, run_id=RUN2, model_version="fedcba9876543210")
        for c in fx.cells
        if c["slide_uri"].endswith("aml-01.svs")
    ][1:]
    slide = dict(next(s for s in fx.slides if s["slide_uri"].endswith("aml-01.svs")), run_id=RUN2)
    slide["finished_at"] = slide["finished_at"].replace(day=28)
    import pyarrow as pa

    from pipeline.schema import CELL_SCHEMA, SLIDE_SCHEMA

    pq.write_table(
        pa.Table.from_pylist(aml, schema=CELL_SCHEMA),
        tmp_path / f"cells/run_date={DATE2}/rerun.parquet",
    )
    pq.write_table(
        pa.Table.from_pylist([slide], schema=SLIDE_SCHEMA),
        tmp_path / f"slides/run_date={DATE2}/rerun.parquet",
    )
    all_rows = (
        query_arrow(str(tmp_path), "SELECT count(*) FROM cells WHERE slide_uri LIKE '%aml-01.svs'")
        .column(0)[0]
        .as_py()
    )
    cur = query_arrow(
        str(tmp_path),
        "SELECT count(*), any_value(run_id) FROM current_cells WHERE slide_uri LIKE '%aml-01.svs'",
    ).to_pylist()[0]
    assert all_rows == 22 + 21
    assert list(cur.values()) == [21, RUN2]


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT * FROM cells) TO '{tmp}/leak.csv'",
        "SELECT * FROM read_csv('{tmp}/secret.csv')",
        "SELECT * FROM '{tmp}/secret.csv'",
        "SELECT * FROM read_parquet('{root}/cells/run_date=2026-11-27/part-run-20261127-000001.parquet')",
        "SELECT * FROM read_parquet('{root}/_staging/cells/run_date=2026-11-29/part-x.parquet')",
        "ATTACH '{tmp}/other.duckdb' AS other",
        "INSTALL httpfs",
        "LOAD httpfs",
        "CREATE TABLE t AS SELECT 1",
        "INSERT INTO cells SELECT * FROM cells",
        "SET enable_external_access = true",
        "PRAGMA database_list",
        "SELECT 1; SELECT 2",
        "DROP VIEW cells",
        "EXPORT DATABASE '{tmp}/dump'",
    ],
)
def test_refuses_anything_but_reading_the_views(fx, tmp_path, sql):
    (tmp_path / "secret.csv").write_text("a,b\n1,2\n")
    with pytest.raises(QueryError):
        query_arrow(str(fx.root), sql.format(tmp=tmp_path, root=fx.root))
    assert not (tmp_path / "leak.csv").exists() and not (tmp_path / "other.duckdb").exists()


def test_query_relation_api_and_errors(fx, tmp_path):
    rel = query(
        str(fx.root), "WITH t AS (SELECT cell_type FROM current_cells) FROM t SELECT count(*) AS n"
    )
    assert rel.fetchall() == [(len(fx.cells),)]
    with pytest.raises(QueryError, match="parse|failed"):
        query_arrow(str(fx.root), "SELEC nonsense")
    with pytest.raises(QueryError, match="no_such_column"):
        query_arrow(str(fx.root), "SELECT no_such_column FROM cells")
    with pytest.raises(ConfigError, match="no such directory"):
        open_outputs(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="s3://"):
        open_outputs("gs://bucket/x")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert query_arrow(str(empty), "SELECT count(*) AS n FROM cells").to_pylist() == [{"n": 0}]


def test_cli_formats(fx, tmp_path, capsys):
    sql = "SELECT slide_uri, count(*) AS n, list(DISTINCT cell_type ORDER BY cell_type) AS types FROM current_cells GROUP BY 1 ORDER BY 1"
    assert cli(["query", sql, "--output", str(fx.root)]) == 0
    text = capsys.readouterr().out
    assert "healthy-01.svs" in text and "(3 rows)" in text
    assert cli(["query", sql, "--output", str(fx.root), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [int(r["n"]) for r in rows] == [22, 28, 30] and "myeloblast" in json.loads(
        rows[0]["types"]
    )
    assert cli(["query", sql, "--output", str(fx.root), "--format", "json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["n"] for x in lines] == [22, 28, 30]
    assert (
        cli(
            [
                "query",
                sql,
                "--output",
                str(fx.root),
                "--format",
                "parquet",
                "--out",
                str(tmp_path / "r.parquet"),
            ]
        )
        == 0
    )
    assert pq.read_table(tmp_path / "r.parquet").column("n").to_pylist() == [22, 28, 30]
    assert cli(["query", "SELECT thumbnail_jpeg FROM cells LIMIT 1", "--output", str(fx.root)]) == 0
    assert "bytes>" in capsys.readouterr().out
    assert cli(["query", "DELETE FROM cells", "--output", str(fx.root)]) == 2
    assert "only read-only SELECT" in capsys.readouterr().err
    assert cli(["query", "SELECT 1", "--output", str(fx.root), "--format", "parquet"]) == 2
    assert "--out" in capsys.readouterr().err
