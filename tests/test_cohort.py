"""Cohort analysis on fixture outputs: counts, Wilson/Newcombe intervals, tests, manifest errors."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from scipy import stats

from pipeline.__main__ import main as cli
from pipeline.cohort import (
    benjamini_hochberg,
    cohort_analysis,
    newcombe_interval,
    read_manifest,
    wilson_interval,
    write_results,
)
from pipeline.errors import ConfigError

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
    return _manifest(tmp_path, "slide_id,slide_uri,cohort,patient,age\n"
                     f"{ids['healthy-01']},,control,P1,40\n"
                     f",s3://smears/archive/aml-01.svs,leukemia,P2,63\n"
                     f"{ids['cll-01']},,leukemia,P3,70\n"
                     f",s3://smears/archive/broken-01.svs,leukemia,P4,55\n")


def test_wilson_newcombe_bh_known_values():
    lo, hi = wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert wilson_interval(0, 10)[0] == 0.0 and round(wilson_interval(0, 10)[1], 4) == 0.2775
    assert wilson_interval(0, 0) == (None, None)
    # Newcombe (1998) example 1: 56/70 vs 48/80 -> 0.0524 to 0.3339
    lo, hi = newcombe_interval(56, 70, 48, 80)
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)
    assert benjamini_hochberg([0.01, 0.04, 0.03, 0.005, None]) == pytest.approx([0.02, 0.04, 0.04, 0.02, None])


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
            assert x["typed_cells"] == len(typed) and x["slides"] == len(names) and x["patients"] == len(names)
            assert x["untyped_cells"] == len(cells) - len(typed)
            assert (x["ci_low"], x["ci_high"]) == pytest.approx(wilson_interval(x["count"], len(typed)))
    comp = {x["cell_type"]: x for x in r.comparison.to_pylist()}
    m = comp["myeloblast"]
    assert (m["count_a"], m["typed_a"], m["count_b"], m["typed_b"]) == (0, 28, 10, 50)
    assert m["p_value"] == pytest.approx(stats.fisher_exact([[0, 28], [10, 40]])[1])
    assert m["q_value"] == pytest.approx(benjamini_hochberg([x["p_value"] for x in r.comparison.to_pylist()])[
        [x["cell_type"] for x in r.comparison.to_pylist()].index("myeloblast")])
    assert m["difference"] == pytest.approx(-0.2) and m["diff_ci_low"] < -0.2 < m["diff_ci_high"] < 0
    unit = {x["cell_type"]: x for x in r.unit_comparison.to_pylist()}
    assert unit["myeloblast"]["units_a"] == 1 and unit["myeloblast"]["p_value"] is None  # needs >= 2 per cohort
    attrs = [x for x in r.attributes.to_pylist() if x["cohort"] == "control" and x["cell_type"] == "neutrophil"
             and x["attribute"] == "nucleus_shape"]
    expected = Counter(c["nucleus_shape"] for c in fx.cells if c["slide_uri"].endswith("healthy-01.svs")
                       and c["cell_type"] == "neutrophil" and c["nucleus_shape"])
    assert {x["value"]: x["count"] for x in attrs} == dict(expected)
    assert all(x["mentioned"] == sum(expected.values()) for x in attrs)
    assert r.unmatched_manifest == [
        "line 5: s3://smears/archive/broken-01.svs: no successfully processed cells (last status failed: "
        "SlideOpenError: s3://smears/archive/broken-01.svs: not a TIFF file)"]
    assert r.unlisted_slides == []
    assert r.slides.column("age").to_pylist()[0] == "40"


def test_unit_level_test_with_several_patients(fx, tmp_path):
    ids = fx.slide_ids
    m = _manifest(tmp_path, "slide_id,cohort,patient\n"
                  f"{ids['healthy-01']},A,P1\n{ids['aml-01']},A,P2\n{ids['cll-01']},B,P3\n")
    r = cohort_analysis(str(fx.root), m)
    row = next(x for x in r.unit_comparison.to_pylist() if x["cell_type"] == "lymphocyte")
    assert (row["units_a"], row["units_b"]) == (2, 1) and row["p_value"] is None
    r = cohort_analysis(str(fx.root), m, exclude_flagged=True)
    assert sum(x["count"] for x in r.differential.to_pylist()) == sum(
        1 for c in fx.cells if c["cell_type"] and not c["qc_flags"])


@pytest.mark.parametrize("text, message", [
    ("slide_id,group\nx,A\n", "missing column 'cohort'"),
    ("patient,cohort\nP1,A\n", "needs a 'slide_id' or 'slide_uri' column"),
    ("slide_uri,cohort\ns3://smears/archive/aml-01.svs,\n", ":2: empty cohort"),
    ("slide_uri,cohort\ns3://smears/archive/aml-01.svs,A\ns3://smears/archive/aml-01.svs,B\n", ":3: slide s3://smears/archive/aml-01.svs already listed on line 2"),
    ("", "empty file"),
])
def test_manifest_errors(fx, tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        cohort_analysis(str(fx.root), _manifest(tmp_path, text))
    assert message in str(exc.value) and "cohorts.csv" in str(exc.value)


def test_unknown_slides(fx, tmp_path):
    m = _manifest(tmp_path, "slide_uri,cohort\ns3://smears/archive/aml-01.svs,A\ns3://nope/x.svs,B\n")
    with pytest.raises(ConfigError, match=r"1 slide\(s\) not found in the outputs: line 3: s3://nope/x.svs"):
        cohort_analysis(str(fx.root), m)
    r = cohort_analysis(str(fx.root), m, allow_unknown=True)
    assert r.unmatched_manifest == ["line 3: s3://nope/x.svs: not found in the outputs"]
    assert len(r.unlisted_slides) == 2  # healthy-01 and cll-01 have cells but are not listed
    assert read_manifest(m).column("slide_uri").to_pylist() == ["s3://smears/archive/aml-01.svs", "s3://nope/x.svs"]


def test_cli_writes_parquet_and_csv(fx, manifest, tmp_path, capsys):
    out = tmp_path / "res"
    assert cli(["cohort", "--output", str(fx.root), "--manifest", str(manifest), "--out", str(out)]) == 0
    text = capsys.readouterr()
    assert "leukemia: 2 slides, 50 typed cells" in text.out and "broken-01" in text.err
    for name in ("differential", "attributes", "comparison", "unit_comparison", "slides"):
        assert (out / f"{name}.csv").stat().st_size > 0
        assert pq.read_table(out / f"{name}.parquet").num_rows > 0
    assert "broken-01" in (out / "unmatched.csv").read_text()
    assert cli(["cohort", "--output", str(fx.root), "--manifest", str(tmp_path / "none.csv")]) == 2
    assert "cannot read" in capsys.readouterr().err
    r = cohort_analysis(str(fx.root), manifest)
    assert len(write_results(r, tmp_path / "again")) == 11
