"""Cohort analysis on fixture outputs: counts, Wilson/Newcombe intervals, tests, manifest errors."""

from __future__ import annotations

import json
import math
import random
import re
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from pipeline.__main__ import main as cli
from pipeline.cohort import (
    benjamini_hochberg,
    cohort_analysis,
    min_attainable_p,
    newcombe_interval,
    read_manifest,
    summarize,
    wilson_interval,
    write_results,
)
from pipeline.errors import ConfigError
from pipeline.schema import CELL_SCHEMA, RUN_SCHEMA, SLIDE_SCHEMA

sys.path.insert(0, str(Path(__file__).parent))
from outputs_fixture import build_outputs  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_outputs(tmp_path_factory.mktemp("outputs"))


def _manifest(tmp_path, text: str) -> Path:
    p = tmp_path / "cohorts.csv"
    p.write_text(text)
    return p


@pytest.fixture
def manifest(fx, tmp_path):
    ids = fx.slide_ids
    return _manifest(
        tmp_path,
        "slide_id,slide_uri,cohort,patient,age\n"
        f"{ids['healthy-01']},,control,P1,40\n"
        f",s3://smears/archive/aml-01.svs,leukemia,P2,63\n"
        f"{ids['cll-01']},,leukemia,P3,70\n"
        f",s3://smears/archive/broken-01.svs,leukemia,P4,55\n",
    )


def test_wilson_newcombe_bh_known_values():
    lo, hi = wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert wilson_interval(0, 10)[0] == 0.0 and round(wilson_interval(0, 10)[1], 4) == 0.2775
    assert wilson_interval(0, 0) == (None, None)
    # Newcombe (1998) example 1: 56/70 vs 48/80 -> 0.0524 to 0.3339
    lo, hi = newcombe_interval(56, 70, 48, 80)
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)
    assert benjamini_hochberg([0.01, 0.04, 0.03, 0.005, None]) == pytest.approx(
        [0.02, 0.04, 0.04, 0.02, None]
    )


def _wilson_closed_form(k: int, n: int) -> tuple[float, float]:
    """Wilson (1927) score interval written out, the formula the scipy call must reproduce."""
    z = stats.norm.ppf(0.975)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


def _bh_step_up(p: list[float]) -> list[float]:
    """Benjamini-Hochberg (1995) step-up q-values, written out: q_(i) = min_{j>=i} p_(j) m / j."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    q, running = [0.0] * m, 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        q[i] = running
    return q


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 28, 80, 1000, 123_457])
def test_wilson_matches_the_closed_form(n):
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        lo, hi = wilson_interval(k, n)
        ref_lo, ref_hi = _wilson_closed_form(k, n)
        assert abs(lo - ref_lo) < 1e-9 and abs(hi - ref_hi) < 1e-9, (k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
    # the bounds at the edges are exactly 0 and 1, not rounding noise either side
    assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0


def test_wilson_published_values():
    # Newcombe (1998), Table I: 81/263 -> 0.2553 to 0.3662; 15/148 -> 0.0624 to 0.1605
    assert [round(x, 4) for x in wilson_interval(81, 263)] == [0.2553, 0.3662]
    assert [round(x, 4) for x in wilson_interval(15, 148)] == [0.0624, 0.1605]
    assert [round(x, 4) for x in wilson_interval(1, 29)] == [0.0061, 0.1718]


def test_benjamini_hochberg_matches_step_up_and_keeps_missing_out():
    rng = random.Random(13)
    for m in (1, 2, 5, 40):
        p = [rng.random() ** 3 for _ in range(m)]
        p[rng.randrange(m)] = p[0]  # ties
        assert benjamini_hochberg(p) == pytest.approx(_bh_step_up(p), abs=1e-9)
    # None and NaN are not tests: outside the family (m counts the others) and None in the result
    p = [0.01, None, 0.04, float("nan"), 0.03, 0.005]
    family = _bh_step_up([0.01, 0.04, 0.03, 0.005])
    q = benjamini_hochberg(p)
    assert q[1] is None and q[3] is None
    assert [q[0], q[2], q[4], q[5]] == pytest.approx(family, abs=1e-9)
    assert benjamini_hochberg([]) == [] and benjamini_hochberg([None]) == [None]
    assert benjamini_hochberg([1.0, 1.0]) == [1.0, 1.0]  # capped at 1


def test_fisher_exact_known_value():
    """Fisher's tea-tasting table: two-sided p = (1 + 16 + 16 + 1) / 70 exactly."""
    assert abs(stats.fisher_exact([[3, 1], [1, 3]])[1] - 34 / 70) < 1e-12


def test_cohort_numbers(fx, manifest):
    r = cohort_analysis(str(fx.root), manifest)
    groups = {"control": ["healthy-01"], "leukemia": ["aml-01", "cll-01"]}
    for cohort, names in groups.items():
        cells = [c for c in fx.cells if any(c["slide_uri"].endswith(f"/{n}.svs") for n in names)]
        typed = [c for c in cells if c["cell_type"]]
        expected = Counter(c["cell_type"] for c in typed)
        rows = [x for x in r.differential.to_pylist() if x["cohort"] == cohort]
        assert {x["cell_type"]: x["count"] for x in rows if x["count"]} == dict(expected)
        for x in rows:
            assert (
                x["typed_cells"] == len(typed)
                and x["slides"] == len(names)
                and x["patients"] == len(names)
            )
            assert x["untyped_cells"] == len(cells) - len(typed)
            assert (x["ci_low"], x["ci_high"]) == pytest.approx(
                wilson_interval(x["count"], len(typed))
            )
    comp = {x["cell_type"]: x for x in r.comparison.to_pylist()}
    m = comp["myeloblast"]
    assert (m["count_a"], m["typed_a"], m["count_b"], m["typed_b"]) == (0, 28, 10, 50)
    assert m["p_value"] == pytest.approx(stats.fisher_exact([[0, 28], [10, 40]])[1])
    assert m["q_value"] == pytest.approx(
        benjamini_hochberg([x["p_value"] for x in r.comparison.to_pylist()])[
            [x["cell_type"] for x in r.comparison.to_pylist()].index("myeloblast")
        ]
    )
    assert (
        m["difference"] == pytest.approx(-0.2) and m["diff_ci_low"] < -0.2 < m["diff_ci_high"] < 0
    )
    unit = {x["cell_type"]: x for x in r.unit_comparison.to_pylist()}
    assert (
        unit["myeloblast"]["units_a"] == 1 and unit["myeloblast"]["p_value"] is None
    )  # needs >= 2 per cohort
    attrs = [
        x
        for x in r.attributes.to_pylist()
        if x["cohort"] == "control"
        and x["cell_type"] == "neutrophil"
        and x["attribute"] == "nucleus_shape"
    ]
    expected = Counter(
        c["nucleus_shape"]
        for c in fx.cells
        if c["slide_uri"].endswith("healthy-01.svs")
        and c["cell_type"] == "neutrophil"
        and c["nucleus_shape"]
    )
    assert {x["value"]: x["count"] for x in attrs} == dict(expected)
    assert all(x["mentioned"] == sum(expected.values()) for x in attrs)
    assert r.unmatched_manifest == [
        "line 5: s3://smears/archive/broken-01.svs: no successfully processed cells (last status failed: "
        "SlideOpenError: s3://smears/archive/broken-01.svs: not a TIFF file)"
    ]
    assert r.unlisted_slides == []
    assert r.slides.column("age").to_pylist()[0] == "40"


def test_unit_level_test_with_several_patients(fx, tmp_path):
    ids = fx.slide_ids
    m = _manifest(
        tmp_path,
        "slide_id,cohort,patient\n"
        f"{ids['healthy-01']},A,P1\n{ids['aml-01']},A,P2\n{ids['cll-01']},B,P3\n",
    )
    r = cohort_analysis(str(fx.root), m)
    row = next(x for x in r.unit_comparison.to_pylist() if x["cell_type"] == "lymphocyte")
    assert (row["units_a"], row["units_b"]) == (2, 1) and row["p_value"] is None
    r = cohort_analysis(str(fx.root), m, exclude_flagged=True)
    assert sum(x["count"] for x in r.differential.to_pylist()) == sum(
        1 for c in fx.cells if c["cell_type"] and not c["qc_flags"]
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("slide_id,group\nx,A\n", "missing column 'cohort'"),
        ("patient,cohort\nP1,A\n", "needs a 'slide_id' or 'slide_uri' column"),
        ("slide_uri,cohort\ns3://smears/archive/aml-01.svs,\n", ":2: empty cohort"),
        (
            "slide_uri,cohort\ns3://smears/archive/aml-01.svs,A\ns3://smears/archive/aml-01.svs,B\n",
            ":3: slide s3://smears/archive/aml-01.svs already listed on line 2",
        ),
        ("", "empty file"),
    ],
)
def test_manifest_errors(fx, tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        cohort_analysis(str(fx.root), _manifest(tmp_path, text))
    assert message in str(exc.value) and "cohorts.csv" in str(exc.value)


def test_unknown_slides(fx, tmp_path):
    m = _manifest(
        tmp_path, "slide_uri,cohort\ns3://smears/archive/aml-01.svs,A\ns3://nope/x.svs,B\n"
    )
    with pytest.raises(
        ConfigError, match=r"1 slide\(s\) not found in the outputs: line 3: s3://nope/x.svs"
    ):
        cohort_analysis(str(fx.root), m)
    r = cohort_analysis(str(fx.root), m, allow_unknown=True)
    assert r.unmatched_manifest == ["line 3: s3://nope/x.svs: not found in the outputs"]
    assert len(r.unlisted_slides) == 2  # healthy-01 and cll-01 have cells but are not listed
    assert read_manifest(m).column("slide_uri").to_pylist() == [
        "s3://smears/archive/aml-01.svs",
        "s3://nope/x.svs",
    ]


def test_cli_writes_parquet_and_csv(fx, manifest, tmp_path, capsys):
    out = tmp_path / "res"
    assert (
        cli(["cohort", "--output", str(fx.root), "--manifest", str(manifest), "--out", str(out)])
        == 0
    )
    text = capsys.readouterr()
    assert "leukemia: 2 slides, 50 typed cells" in text.out and "broken-01" in text.err
    for name in ("differential", "attributes", "comparison", "unit_comparison", "units", "slides"):
        assert (out / f"{name}.csv").stat().st_size > 0
        assert pq.read_table(out / f"{name}.parquet").num_rows > 0
    assert "broken-01" in (out / "unmatched.csv").read_text()
    assert cli(["cohort", "--output", str(fx.root), "--manifest", str(tmp_path / "none.csv")]) == 2
    assert "cannot read" in capsys.readouterr().err
    r = cohort_analysis(str(fx.root), manifest)
    assert (
        len(write_results(r, tmp_path / "again")) == 6 * 2 + 2
    )  # tables, unmatched.csv, summary.json


# --- patient level first; pooled cells are descriptive only ---------------------------------------

AML_VS_OTHERS = (
    "slide_uri,cohort,patient\ns3://smears/archive/aml-01.svs,AML,P1\n"
    "s3://smears/archive/healthy-01.svs,other,P2\ns3://smears/archive/cll-01.svs,other,P3\n"
)
POOLED_LABEL = "cells pooled per group, not independent samples: descriptive only"


@pytest.mark.parametrize(
    "n1, n2", [(1, 1), (1, 2), (2, 2), (2, 3), (3, 3), (3, 4), (4, 4), (1, 6), (5, 6), (2, 9)]
)
def test_min_attainable_p_is_the_exact_mann_whitney_minimum(n1, n2):
    # the most extreme arrangement (every unit of one cohort above every unit of the other)
    exact = stats.mannwhitneyu(list(range(n1)), list(range(n1, n1 + n2)), method="exact").pvalue
    assert min_attainable_p(n1, n2) == pytest.approx(exact)
    assert min_attainable_p(n2, n1) == pytest.approx(exact)


def test_min_attainable_p_edges():
    assert min_attainable_p(1, 2) == pytest.approx(2 / 3)
    assert min_attainable_p(0, 5) is None
    assert 0 <= min_attainable_p(200, 200) < 1e-100


def test_one_vs_two_patients_is_too_small_for_any_test(fx, tmp_path, capsys):
    m = _manifest(tmp_path, AML_VS_OTHERS)
    r = cohort_analysis(str(fx.root), m)
    # pooled cells make myeloblasts (10/22 vs 0/56) "significant": exactly what must not be headlined
    pooled = {x["cell_type"]: x for x in r.comparison.to_pylist()}
    assert pooled["myeloblast"]["q_value"] < 0.05
    assert all(x["scope"] == POOLED_LABEL for x in pooled.values())
    unit = {x["cell_type"]: x for x in r.unit_comparison.to_pylist()}
    u = unit["myeloblast"]
    assert (
        (u["units_a"], u["units_b"]) == (1, 2) and u["p_value"] is None and u["testable"] is False
    )
    assert u["min_attainable_p"] == pytest.approx(2 / 3) and "0.667" in u["note"]
    per_patient = {(x["unit"], x["cell_type"]): x for x in r.units.to_pylist()}
    assert (
        per_patient[("P1", "myeloblast")]["count"],
        per_patient[("P1", "myeloblast")]["typed_cells"],
    ) == (10, 22)
    assert per_patient[("P3", "myeloblast")]["proportion"] == 0.0

    out = tmp_path / "res"
    assert cli(["cohort", "--output", str(fx.root), "--manifest", str(m), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    headline = text.splitlines()[0]
    assert "too few patients" in headline and "1 vs 2" in headline and "0.667" in headline, headline
    assert not re.search(r"\d+ cell-type differences with BH q < 0.05", text)
    assert POOLED_LABEL in text
    # the pooled section comes after the patient-level one and every Fisher mention sits in it
    assert text.index(POOLED_LABEL) > text.index("per-patient")
    assert all(
        i > text.index(POOLED_LABEL) for i in (m_.start() for m_ in re.finditer("Fisher", text))
    )
    s = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert s["tests_possible"] is False and s["significant"] == [] and s["headline"] == headline
    assert s["pairs"] == [
        {
            "cohort_a": "AML",
            "cohort_b": "other",
            "units_a": 1,
            "units_b": 2,
            "min_attainable_p": pytest.approx(2 / 3),
            "testable": False,
            "reason": s["pairs"][0]["reason"],
        }
    ]
    assert s["cell_level"]["scope"] == POOLED_LABEL
    assert (
        cli(
            [
                "cohort",
                "--output",
                str(fx.root),
                "--manifest",
                str(m),
                "--out",
                str(out),
                "--format",
                "json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["headline"] == headline


def _cohort_outputs(fx, root: Path, groups: dict[str, list[dict[str, int]]]) -> Path:
    """Outputs with one slide per patient holding the given cell-type counts; returns a manifest."""
    cell0 = next(c for c in fx.cells if c["cell_type"])
    slide0 = next(s for s in fx.slides if s["status"] == "ok")
    cells, slides, lines = [], [], ["slide_uri,cohort,patient"]
    for cohort, patients in groups.items():
        for i, counts in enumerate(patients):
            uri, sid = f"s3://smears/{cohort}-{i}.svs", f"{cohort}-{i}".ljust(32, "0")
            slides.append(
                dict(slide0, slide_id=sid, slide_uri=uri, cell_count=sum(counts.values()))
            )
            cells += [
                dict(
                    cell0,
                    cell_id=f"{sid}-{t}-{j}",
                    slide_id=sid,
                    slide_uri=uri,
                    cell_type=t,
                    qc_flags=[],
                )
                for t, k in counts.items()
                for j in range(k)
            ]
            lines.append(f"{uri},{cohort},{cohort}-P{i}")
    for table, rows, schema in (
        ("cells", cells, CELL_SCHEMA),
        ("slides", slides, SLIDE_SCHEMA),
        ("runs", fx.runs[:1], RUN_SCHEMA),
    ):
        d = root / table / "run_date=2026-11-27"
        d.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), d / "part-x.parquet")
    (root.parent / "cohorts.csv").write_text("\n".join(lines) + "\n")
    return root.parent / "cohorts.csv"


def test_four_vs_four_patients_exact_test_with_ties(fx, tmp_path, capsys):
    groups = {
        "A": [{"neutrophil": 15, "lymphocyte": 5 + i} for i in range(4)],
        "B": [{"neutrophil": 15, "lymphocyte": 4 + i, "myeloblast": 5 + i} for i in range(4)],
    }
    m = _cohort_outputs(fx, tmp_path / "out", groups)
    r = cohort_analysis(str(tmp_path / "out"), m)
    unit = {x["cell_type"]: x for x in r.unit_comparison.to_pylist()}
    mb = unit["myeloblast"]
    # A's proportions tie at 0: the exact permutation p is 2/C(8,4); the normal approximation says 0.02
    assert mb["testable"] is True and mb["p_value"] == pytest.approx(2 / 70)
    assert mb["min_attainable_p"] == pytest.approx(2 / 70) and mb["method"] == "exact"
    assert mb["q_value"] == pytest.approx(
        stats.false_discovery_control([x["p_value"] for x in r.unit_comparison.to_pylist()])[
            list(unit).index("myeloblast")
        ]
    )
    s = summarize(r)
    assert s["tests_possible"] is True and "myeloblast" in {
        x["cell_type"] for x in s["significant"]
    }
    assert s["headline"].startswith(
        f"{len(s['significant'])} of 3 cell-type comparisons differ between cohorts"
    )
    assert "patient" in s["headline"] and "Mann–Whitney" in s["headline"]


def test_three_vs_three_patients_cannot_reach_005(fx, tmp_path):
    groups = {"A": [{"neutrophil": 20}] * 3, "B": [{"neutrophil": 10, "myeloblast": 10}] * 3}
    m = _cohort_outputs(fx, tmp_path / "out", groups)
    s = summarize(cohort_analysis(str(tmp_path / "out"), m))
    assert s["tests_possible"] is False
    assert "3 vs 3" in s["headline"] and "0.1" in s["headline"] and "4 vs 4" in s["headline"]


def test_slides_as_units_are_named_as_such(fx, tmp_path):
    ids = fx.slide_ids
    m = _manifest(
        tmp_path, f"slide_id,cohort\n{ids['healthy-01']},A\n{ids['aml-01']},B\n{ids['cll-01']},B\n"
    )
    s = summarize(cohort_analysis(str(fx.root), m))
    assert s["unit"] == "slide" and "too few slides" in s["headline"]
