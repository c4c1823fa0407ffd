"""QuPath GeoJSON export: structure, geometry, classification, measurements, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipeline.__main__ import main as cli
from pipeline.errors import ConfigError
from pipeline.qupath import MEASUREMENTS, export_qupath

sys.path.insert(0, str(Path(__file__).parent))
from outputs_fixture import build_outputs  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_outputs(tmp_path_factory.mktemp("outputs"))


def test_geojson_structure(fx, tmp_path):
    sid = fx.slide_ids["aml-01"]
    out = tmp_path / "aml.geojson"
    assert (
        cli(["export-qupath", "--output", str(fx.root), "--slide", sid[:10], "--out", str(out)])
        == 0
    )
    doc = json.loads(out.read_text())
    cells = sorted((c for c in fx.cells if c["slide_id"] == sid), key=lambda c: c["cell_index"])
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(cells) == 22
    for f, c in zip(doc["features"], cells):
        assert f["type"] == "Feature" and f["id"] == c["cell_id"]
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
        assert ring[0] == [c["bbox_x0"], c["bbox_y0"]] and ring[2] == [c["bbox_x1"], c["bbox_y1"]]
        p = f["properties"]
        assert p["objectType"] == "detection"
        assert (
            p["classification"]["name"] == c["cell_type"] and len(p["classification"]["color"]) == 3
        )
        assert p["caption"] == c["caption"] and p["qc_flags"] == c["qc_flags"]
        assert p["measurements"]["Cell: Diameter µm"] == pytest.approx(c["cell_diameter_um"])
        assert set(p["measurements"]) == set(MEASUREMENTS.values())
        assert all(isinstance(v, float) for v in p["measurements"].values())
    assert {f["properties"]["classification"]["name"] for f in doc["features"]} == {
        "myeloblast",
        "neutrophil",
        "lymphocyte",
        "monocyte",
    }


def test_untyped_cells_have_no_classification(fx, tmp_path):
    out = tmp_path / "h.geojson"
    n = export_qupath(str(fx.root), "s3://smears/archive/healthy-01.svs", out)
    feats = json.loads(out.read_text())["features"]
    assert n == len(feats) == 30
    assert sum("classification" not in f["properties"] for f in feats) == 2


def test_errors(fx, tmp_path):
    with pytest.raises(ConfigError, match="no such slide"):
        export_qupath(str(fx.root), "ffffffffffff", tmp_path / "x.geojson")
    with pytest.raises(
        ConfigError, match="no successfully processed cells .*failed: SlideOpenError"
    ):
        export_qupath(str(fx.root), "s3://smears/archive/broken-01.svs", tmp_path / "x.geojson")
    with pytest.raises(ConfigError, match="ambiguous"):
        export_qupath(str(fx.root), "", tmp_path / "x.geojson")
