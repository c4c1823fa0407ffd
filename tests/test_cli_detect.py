"""``python -m pipeline detect`` and ``make-samples``: Parquet out, crops, per-file errors."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.__main__ import main
from pipeline.schema import DETECT_SCHEMA

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::FutureWarning")]

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("samples")
    assert main(["make-samples", str(d)]) == 0
    return d


def test_make_samples_writes_slides_and_truth(sample_dir, capsys):
    names = sorted(p.name for p in sample_dir.iterdir())
    assert names == [
        "sample_1.json",
        "sample_1.tiff",
        "sample_2.json",
        "sample_2.svs",
        "sample_3.json",
        "sample_3.tiff",
    ]


def test_detect_batch_with_a_bad_file(sample_dir, tmp_path, capsys, shared_data):
    good = sample_dir / "sample_2.svs"
    bad = shared_data / "openslide_fixtures" / "unreadable.svs"
    empty = tmp_path / "leer datei.tiff"
    empty.write_bytes(b"")
    out = tmp_path / "out" / "cells.parquet"
    crops = tmp_path / "crops"
    rc = main(
        [
            "detect",
            str(bad),
            str(good),
            str(empty),
            "--out",
            str(out),
            "--crops-dir",
            str(crops),
            "--crop-um",
            "30",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 1
    err_lines = cap.err.strip().splitlines()
    assert err_lines == [
        f"error: {bad}: tile read failed at level 0: Bogus marker length",
        f"error: {empty}: empty file (0 bytes)",
    ]
    summary = [ln for ln in cap.out.splitlines() if ln.startswith(str(good))]
    assert len(summary) == 1
    assert "cells; mpp 0.0720 (metadata); openslide:aperio 2800x2160" in summary[0]
    assert "flags:" in summary[0]
    table = pq.read_table(out)
    assert table.schema.equals(DETECT_SCHEMA, check_metadata=False)
    n = table.num_rows
    assert n >= 10 and f"{good}: {n} cells" in summary[0]
    rows = table.to_pylist()
    assert {r["source"] for r in rows} == {str(good)}
    assert [r["cell_index"] for r in rows] == list(range(n))
    assert all(r["crop_size_um"] == 30.0 for r in rows)
    pngs = sorted((crops / "sample_2").glob("*.png"))
    assert len(pngs) == n
    assert Image.open(pngs[0]).size == (224, 224)


def test_all_good_exit_zero_and_mpp_flag(tmp_path, capsys):
    field = REPO_ROOT / "pipeline" / "sample_data" / "bccd" / "JPEGImages" / "BloodImage_00000.jpg"
    out = tmp_path / "c.parquet"
    assert main(["detect", str(field), "--out", str(out), "--mpp", "0.072"]) == 0
    assert "(user)" in capsys.readouterr().out
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 1 and rows[0]["mpp_source"] == "user" and rows[0]["mpp"] == 0.072


def test_bad_flag_is_a_user_error(tmp_path, capsys):
    rc = main(["detect", "x.svs", "--out", str(tmp_path / "o.parquet"), "--crop-um", "-3"])
    assert rc == 2
    assert "--crop-um" in capsys.readouterr().err


def test_runs_as_a_module(tmp_path, shared_data):
    out = tmp_path / "o.parquet"
    bad = shared_data / "openslide_fixtures" / "unopenable.tiff"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "detect", str(bad), "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"error: {bad}: OpenSlide cannot open this generic-tiff file: Unsupported TIFF compression: 52479"
    )
    assert pq.read_table(out).num_rows == 0
