"""HTML report: self-contained content checks, then a real render in headless Chromium.

The Chromium part runs Debian's ``/usr/bin/chromium`` (installed by scripts/ensure_chromium.sh,
which the Makefile's test target calls) and is skipped, saying why, only when it is missing.
Screenshots are kept in ``test-artifacts/`` (git-ignored) for a human look.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pipeline.__main__ import main as cli
from pipeline.errors import ConfigError
from pipeline.report import build_report

sys.path.insert(0, str(Path(__file__).parent))
from outputs_fixture import build_outputs  # noqa: E402

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_outputs(tmp_path_factory.mktemp("outputs"))


@pytest.fixture(scope="module")
def manifest(fx, tmp_path_factory):
    p = tmp_path_factory.mktemp("m") / "cohorts.csv"
    p.write_text(
        "slide_uri,cohort,patient\ns3://smears/archive/healthy-01.svs,control,P1\n"
        "s3://smears/archive/aml-01.svs,leukemia,P2\ns3://smears/archive/cll-01.svs,leukemia,P3\n"
    )
    return p


@pytest.fixture(scope="module")
def report(fx, manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("r") / "report.html"
    stats = build_report(str(fx.root), out, manifest=manifest, page_size=20)
    return out, stats


def _blob(text: str) -> dict:
    m = re.search(
        r"<script id='cell-data' type='application/json'>(.*?)</script>", text, flags=re.S
    )
    return json.loads(m.group(1).replace("<\\/", "</"))


def test_self_contained_and_complete(fx, report):
    path, stats = report
    text = path.read_text(encoding="utf-8")
    assert stats.cells == len(fx.cells) == 80 and stats.slides == 3
    # nothing fetched at view time: no external src/href, no <link>, no remote scripts
    assert not re.search(r"""(src|href)=['"](https?:)?//""", text)
    assert "<link" not in text and "@import" not in text and "url(" not in text
    blob = _blob(text)
    assert len(blob["rows"]) == len(blob["thumbnails"]) == 80
    for b64 in blob["thumbnails"]:
        assert base64.b64decode(b64)[:3] == b"\xff\xd8\xff"  # JPEG
    col = blob["columns"].index("cell_type")
    types = [r[col] for r in blob["rows"]]
    order = [t for i, t in enumerate(types) if i == 0 or t != types[i - 1]]
    assert len(order) == len(set(order))  # grouped by cell type
    assert Counter(types) == Counter(c["cell_type"] for c in fx.cells)
    # run summary, last run failures with reasons, per-slide charts, cohorts
    assert "run-20261128-000001" in text and "tile 12 at level 0 cannot be decoded" in text
    assert text.count("class='diff-chart'") == 3 + 2  # 3 slides + 2 cohorts
    assert text.count("class='positions'") == 3
    assert "<h3>leukemia" in text and "Comparison between cohorts" in text
    assert "Attribute frequencies per cell type and cohort" in text
    aml_chart = text[text.index("id='slide-" + fx.slide_ids["aml-01"]) :]
    assert (
        "data-type='myeloblast' data-count='10'"
        in aml_chart[: aml_chart.index("class='positions'")]
    )
    circles = re.findall(r"<circle ", text)
    assert len(circles) == 80


def test_slide_filter_and_errors(fx, tmp_path, capsys):
    out = tmp_path / "one.html"
    assert (
        cli(
            [
                "report",
                "--output",
                str(fx.root),
                "--out",
                str(out),
                "--slide",
                "s3://smears/archive/cll-01.svs",
                "--thumb-px",
                "0",
            ]
        )
        == 0
    )
    assert "28 cells" in capsys.readouterr().out
    blob = _blob(out.read_text(encoding="utf-8"))
    assert len(blob["rows"]) == 28
    stored = {c["cell_id"]: c["thumbnail_jpeg"] for c in fx.cells}
    ids = [r[blob["columns"].index("cell_id")] for r in blob["rows"]]
    assert all(
        base64.b64decode(t) == stored[i] for i, t in zip(ids, blob["thumbnails"])
    )  # stored bytes kept
    with pytest.raises(ConfigError, match="no such slide"):
        build_report(str(fx.root), tmp_path / "x.html", slide="s3://nope.svs")


def test_cohort_section_leads_with_patients_not_pooled_cells(fx, tmp_path):
    """1 patient vs 2: the pooled-cell Fisher test calls myeloblasts significant; the report must
    say no test is possible and show the pooled test only under its descriptive label."""
    m = tmp_path / "aml.csv"
    m.write_text(
        "slide_uri,cohort,patient\ns3://smears/archive/aml-01.svs,AML,P1\n"
        "s3://smears/archive/healthy-01.svs,other,P2\ns3://smears/archive/cll-01.svs,other,P3\n"
    )
    out = tmp_path / "r.html"
    build_report(str(fx.root), out, manifest=m, thumb_px=0)
    text = out.read_text(encoding="utf-8")
    start = text.index("<section id='cohorts'>")
    sec = text[start : text.index("</section>", start)]
    label = "cells pooled per group, not independent samples: descriptive only"
    head = sec.index("too few patients")
    assert "1 vs 2" in sec[head : head + 300] and "0.667" in sec[head : head + 300]
    assert head < sec.index(label) < sec.index("Fisher")
    assert sec.count("Fisher") == sec[sec.index(label) :].count("Fisher")
    assert "P1" in sec and "45.5%" in sec  # per-patient proportion of myeloblasts, AML patient


def _chromium(
    url: str, tmp_path: Path, screenshot: Path | None = None, size: str = "1400,1800"
) -> str:
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"{CHROMIUM} not installed (scripts/ensure_chromium.sh could not install Debian's chromium)"
        )
    profile = tmp_path / f"profile-{abs(hash(url))}"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        f"--window-size={size}",
        "--dump-dom",
    ]
    if screenshot:
        cmd.append(f"--screenshot={screenshot}")
    proc = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=180)
    shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _cards(dom: str) -> list[dict]:
    return [
        {"type": html.unescape(m.group(1)), "flags": m.group(2).split()}
        for m in re.finditer(
            r'<div class="cell(?: inconsistent)?" data-type="([^"]*)" data-flags="([^"]*)"', dom
        )
    ]


def test_renders_in_chromium_with_filters(fx, report, tmp_path):
    path, _ = report
    ARTIFACTS.mkdir(exist_ok=True)
    url = path.resolve().as_uri()
    dom = _chromium(url, tmp_path, screenshot=ARTIFACTS / "report-overview.png")
    assert 'data-gallery-ready="1"' in dom
    cards = _cards(dom)
    assert len(cards) == 20  # page_size
    assert re.search(r'data-matching="80" data-page="1" data-pages="4"', dom)
    assert dom.count('src="data:image/jpeg;base64,') == 20

    n_lymph = sum(c["cell_type"] == "lymphocyte" for c in fx.cells)
    dom = _chromium(
        url + "#view=gallery&type=lymphocyte", tmp_path, screenshot=ARTIFACTS / "report-gallery.png"
    )
    cards = _cards(dom)
    assert cards and {c["type"] for c in cards} == {"lymphocyte"}
    assert f'data-matching="{n_lymph}"' in dom and '<body class="gallery-only"' in dom

    n_oof = sum("out_of_focus" in c["qc_flags"] for c in fx.cells)
    dom = _chromium(url + "#flag=out_of_focus", tmp_path)
    cards = _cards(dom)
    assert len(cards) == n_oof > 0 and all("out_of_focus" in c["flags"] for c in cards)

    n_bad = sum(c["consistent"] is False for c in fx.cells)
    assert n_bad > 0
    dom = _chromium(url + "#consistency=inconsistent&page=1", tmp_path)
    assert f'data-matching="{n_bad}"' in dom and len(_cards(dom)) == min(n_bad, 20)

    dom = _chromium(url + "#page=4", tmp_path)
    assert 'data-page="4"' in dom and len(_cards(dom)) == 80 - 3 * 20
    for shot in ("report-overview.png", "report-gallery.png"):
        assert (ARTIFACTS / shot).stat().st_size > 20_000  # a real rendered page, not a blank one


def test_report_assets_ship_with_the_package():
    """The page template, stylesheet and script are files: a wheel must carry them, and jinja2
    (which renders the template) must be a runtime dependency, or an installed report breaks."""
    import fnmatch
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = meta["tool"]["setuptools"]["package-data"].get("pipeline", [])
    assets = sorted(
        p
        for p in (REPO / "pipeline" / "_report_assets").iterdir()
        if p.suffix != ".py" and p.is_file()
    )
    assert {p.name for p in assets} >= {
        "report.html.j2",
        "components.html.j2",
        "report.css",
        "report.js",
    }
    for p in assets:
        rel = p.relative_to(REPO / "pipeline").as_posix()
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), (
            f"{rel} is not package data of pipeline"
        )
    deps = [
        re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in meta["project"]["dependencies"]
    ]
    assert "jinja2" in deps
