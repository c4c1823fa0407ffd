"""Per-cell cell-type confidence: scoring, temperature calibration, hostile calibration files,
the ``calibrate`` command and the job's ``cell_type_confidence`` column."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest

pytest.importorskip("torch")

from hemblip.calibration import (  # noqa: E402
    CALIBRATION_FILE,
    FORMAT,
    confidence_nll,
    expected_calibration_error,
    fit_temperature,
    load_calibration,
    reliability_table,
    type_probabilities,
    write_calibration,
)
from hemblip.inference import DEMO_CHECKPOINT, Captioner  # noqa: E402
from hemblip.ontology import CELL_TYPES  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def captioner():
    return Captioner(batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def crops(shared_data):
    from PIL import Image

    paths = sorted((shared_data / "segmentation_wbc" / "dataset1").glob("[0-9][0-9][0-9].png"))[:4]
    paths += sorted((shared_data / "segmentation_wbc" / "dataset2").glob("[0-9][0-9][0-9].png"))[:2]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


# --------------------------------------------------------------------------- the confidence
def test_confidence_is_a_probability_of_the_captioned_type(captioner, crops):
    results = captioner.caption(crops)
    assert any(r.cell_type is not None for r in results)
    for r in results:
        if r.cell_type is None:
            assert r.cell_type_confidence is None
            continue
        assert isinstance(r.cell_type_confidence, float)
        assert 0.0 <= r.cell_type_confidence <= 1.0
        assert r.top_cell_type in CELL_TYPES
        assert r.cell_type_confidence <= r.top_cell_type_probability + 1e-12
    _, scores = captioner.caption_and_score(crops)
    probs = type_probabilities(scores, captioner.calibration.temperature)
    assert probs.shape == (len(crops), len(CELL_TYPES))
    assert np.allclose(probs.sum(axis=1), 1.0) and np.all((probs >= 0) & (probs <= 1))
    for r, p in zip(results, probs):
        if r.cell_type is not None:
            assert r.cell_type_confidence == pytest.approx(p[CELL_TYPES.index(r.cell_type)])


def test_prefix_tree_pass_equals_plain_teacher_forcing(captioner, crops):
    """The one-sequence-per-image tree pass scores each opening exactly like decoding it alone."""
    embeds = captioner.image_features(captioner.pixel_values(crops))
    tree = captioner._prefixes()
    assert tree.node_ids.shape[1] < tree.row_ids.shape[0]  # the shared words are scored once
    fast = captioner._score_tree(tree, embeds)
    plain = captioner._score_rows(tree, embeds)
    assert np.allclose(fast.numpy(), plain.numpy(), atol=1e-4)
    scores = captioner.cell_type_scores(embeds)
    assert captioner._tree_ok and np.all(np.isfinite(scores)) and np.all(scores <= 0)
    # log of a summed probability: both caption styles count for the type
    k = CELL_TYPES.index("neutrophil")
    rows = (tree.owner == k).nonzero().flatten().tolist()
    assert len(rows) == 2
    assert scores[0, k] == pytest.approx(float(np.logaddexp(*plain[0, rows].numpy())), abs=1e-6)


def test_type_confidence_can_be_switched_off(crops):
    cap = Captioner(batch_size=4, device="cpu", type_confidence=False)
    results, scores = cap.caption_and_score(crops[:2])
    assert scores is None
    assert all(r.cell_type_confidence is None and r.top_cell_type is None for r in results)


# --------------------------------------------------------------------------- calibration maths
def _overconfident(n=2000, k=5, seed=0):
    """Scores whose softmax says ~0.95 while the top type is right ~60 % of the time."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, n)
    predicted = np.where(rng.random(n) < 0.6, truth, (truth + rng.integers(1, k, n)) % k)
    scores = rng.normal(0, 0.3, (n, k))
    scores[np.arange(n), predicted] += 3.0
    return scores * 1.5, predicted, truth


def test_calibration_lowers_nll_and_ece_on_an_overconfident_model():
    scores, predicted, truth = _overconfident()
    t = fit_temperature(scores, predicted, truth)
    assert t > 1.5  # over-confident: the fitted temperature softens
    before = confidence_nll(scores, predicted, truth, 1.0)
    after = confidence_nll(scores, predicted, truth, t)
    assert after < before - 0.1
    ok = predicted == truth
    conf = lambda temp: type_probabilities(scores, temp)[np.arange(len(scores)), predicted]  # noqa: E731
    assert (
        expected_calibration_error(conf(t), ok) < 0.05 < expected_calibration_error(conf(1.0), ok)
    )
    # and it is a minimum: neighbouring temperatures do no better
    assert after <= confidence_nll(scores, predicted, truth, t * 1.1) + 1e-9
    assert after <= confidence_nll(scores, predicted, truth, t / 1.1) + 1e-9


def test_calibration_sharpens_an_underconfident_model():
    scores, predicted, truth = _overconfident()
    perfect = predicted.copy()  # always right, but the raw scores say ~0.95: sharpen
    assert fit_temperature(scores, predicted, perfect) < 1.0


def test_reliability_table_bins_and_counts():
    rows = reliability_table([0.05, 0.15, 0.95, 1.0, 0.99], [True, False, True, True, False])
    assert len(rows) == 10 and sum(r["count"] for r in rows) == 5
    assert rows[9]["count"] == 3 and rows[9]["accuracy"] == pytest.approx(2 / 3)
    assert rows[5]["count"] == 0 and rows[5]["accuracy"] is None


# --------------------------------------------------------------------------- calibration.json
def _doc(**over):
    doc = {"format": FORMAT, "temperature": 1.7, "model_version": "abcdef0123456789"}
    doc.update(over)
    return json.dumps(doc)


def _raw(temperature_literal: str) -> str:
    """A calibration file whose temperature is written as given (JSON extensions, overflow)."""
    return _doc(temperature=0.5).replace(
        '"temperature": 0.5', '"temperature": ' + temperature_literal
    )


HOSTILE = {
    "not_json": "temperature: 1.5\n",
    "not_utf8": b"\xff\xfe{}",
    "empty": "",
    "list": "[1.5]",
    "nan_literal": _raw("NaN"),
    "infinity_literal": _raw("-Infinity"),
    "overflowing_float": _raw("1e999"),
    "overflowing_int": _raw("1" + "0" * 400),
    "negative": _doc(temperature=-1.0),
    "zero": _doc(temperature=0),
    "huge": _doc(temperature=1e9),
    "string": _doc(temperature="1.5"),
    "bool": _doc(temperature=True),
    "null": _doc(temperature=None),
    "missing_temperature": json.dumps({"format": FORMAT, "model_version": "abcdef0123456789"}),
    "wrong_format": _doc(format="something-else/9"),
    "no_model_version": json.dumps({"format": FORMAT, "temperature": 1.5}),
    "model_version_not_string": _doc(model_version=12),
    "stale_model_version": _doc(model_version="0000000000000000"),
    "deeply_nested": "[" * 30000 + "]" * 30000,
    "oversized": _doc(padding="x" * 70000),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_calibration_file_is_ignored_with_one_line_warning(tmp_path, caplog, name):
    content = HOSTILE[name]
    path = tmp_path / CALIBRATION_FILE
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with caplog.at_level(logging.WARNING, logger="hemblip.calibration"):
        cal = load_calibration(tmp_path, "abcdef0123456789")
    assert not cal.calibrated and cal.temperature == 1.0 and cal.reason
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    msg = warnings[0].getMessage()
    assert "\n" not in msg and str(path) in msg and "uncalibrated" in msg


def test_calibration_file_that_is_a_link_outside_or_not_a_file(tmp_path, caplog):
    outside = tmp_path / "elsewhere.json"
    outside.write_text(_doc())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.symlink(outside, ckpt / CALIBRATION_FILE)
    with caplog.at_level(logging.WARNING, logger="hemblip.calibration"):
        assert not load_calibration(ckpt, "abcdef0123456789").calibrated
        (ckpt / CALIBRATION_FILE).unlink()
        (ckpt / CALIBRATION_FILE).mkdir()
        assert not load_calibration(ckpt, "abcdef0123456789").calibrated
    assert len(caplog.records) == 2
    assert (
        "outside" in caplog.records[0].getMessage()
        and "regular file" in caplog.records[1].getMessage()
    )


def test_missing_calibration_is_uncalibrated_and_silent(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hemblip.calibration"):
        cal = load_calibration(tmp_path, "abcdef0123456789")
    assert not cal.calibrated and cal.temperature == 1.0 and "no calibration.json" in cal.reason
    assert not caplog.records


def test_valid_calibration_round_trips(tmp_path):
    write_calibration(tmp_path, 1.7, "abcdef0123456789", data="x", ece_after=0.02)
    cal = load_calibration(tmp_path, "abcdef0123456789")
    assert cal.calibrated and cal.temperature == pytest.approx(1.7) and cal.info["data"] == "x"
    for bad in (float("nan"), -1.0, 0.0, 1e6):
        with pytest.raises(ValueError):
            write_calibration(tmp_path, bad, "abcdef0123456789")


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "demo"
    shutil.copytree(DEMO_CHECKPOINT, d)
    (d / CALIBRATION_FILE).unlink(missing_ok=True)
    return d


def test_captioner_loads_despite_a_hostile_calibration_and_applies_a_valid_one(
    demo_copy, crops, caplog
):
    (demo_copy / CALIBRATION_FILE).write_text(_raw("NaN"))
    with caplog.at_level(logging.WARNING, logger="hemblip.calibration"):
        raw = Captioner(demo_copy, batch_size=4, device="cpu")
    assert not raw.calibration.calibrated and len(caplog.records) == 1
    results, scores = raw.caption_and_score(crops)
    write_calibration(demo_copy, 2.5, raw.model_version)
    hot = Captioner(demo_copy, batch_size=4, device="cpu")
    assert hot.calibration.calibrated and hot.calibration.temperature == pytest.approx(2.5)
    assert hot.model_version == raw.model_version  # the file is not part of the weights version
    softened = hot.caption(crops)
    want = type_probabilities(scores, 2.5)
    for r0, r1, p in zip(results, softened, want):
        assert r1.caption == r0.caption
        if r1.cell_type is not None:
            assert r1.cell_type_confidence == pytest.approx(
                p[CELL_TYPES.index(r1.cell_type)], abs=1e-6
            )
            if r0.top_cell_type_probability > 1 / len(CELL_TYPES):
                assert r1.top_cell_type_probability < r0.top_cell_type_probability


def test_bundled_demo_checkpoint_is_calibrated(captioner):
    cal = captioner.calibration
    assert cal.calibrated, f"run `python -m hemblip calibrate --data ../shared/data`: {cal.reason}"
    assert cal.info["split"] == "val"


# --------------------------------------------------------------------------- the command
def test_calibrate_command_writes_file_table_and_diagram(tmp_path, crops, capsys):
    from hemblip.__main__ import main
    from hemblip.data import CaptionSample, write_generic_csv

    types = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "neutrophil"]
    samples = [
        CaptionSample(
            image=c,
            caption=f"This is a {t}.",
            cell_type=t,
            case=None,
            attributes={},
            sample_id=f"c{i}",
            source="t",
            split="val",
        )
        for i, (c, t) in enumerate(zip(crops, types))
    ]
    csv_path = write_generic_csv(samples, tmp_path / "data")
    out, svg = tmp_path / "cal", tmp_path / "docs" / "rel.svg"
    rc = main(
        [
            "calibrate",
            "--data",
            str(csv_path),
            "--out",
            str(out),
            "--diagram",
            str(svg),
            "--device",
            "cpu",
            "--batch-size",
            "4",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "ECE" in text and "| confidence bin | mean confidence | accuracy | cells |" in text
    doc = json.loads((out / CALIBRATION_FILE).read_text())
    cal = load_calibration(out, doc["model_version"])
    assert cal.calibrated and math.isfinite(cal.temperature) and doc["split"] == "val"
    assert doc["fit"]["n_cells"] == 6
    assert ET.fromstring(svg.read_text()).tag.endswith("svg")
    assert main(["calibrate", "--data", str(csv_path), "--split", "test", "--out", str(out)]) == 2


# --------------------------------------------------------------------------- the job row
def test_caption_stage_and_cell_row_carry_the_confidence(crops):
    from pipeline.job.listing import SlidePart, SlideRef
    from pipeline.job.stage_caption import OUTPUT_KEYS, CaptionStage
    from pipeline.job.stage_detect import CELL_FIELDS, DetectSettings, _cell_batch, _slide_batch
    from pipeline.job.stage_write import cells_table
    from pipeline.schema import CELL_SCHEMA

    stage = CaptionStage(None, batch_size=4, device="cpu")
    crop = np.stack(
        [np.asarray(c[:96, :96]) for c in crops[:2]] + [np.zeros((96, 96, 3), np.uint8)]
    )
    ref = SlideRef("s", "/x/s.svs", "e", 1, (SlidePart("/x/s.svs", "s.svs", 1, "e"),), "s.svs")
    ints = {name for name, dtype in CELL_FIELDS if dtype in (np.int32, np.int64)}
    recs = [{**dict.fromkeys(ints, 0), "centroid_x": float(i), "centroid_y": 0.0} for i in range(3)]
    cells = _cell_batch("s", ref, crop, recs, [b""] * 3)
    slide = _slide_batch(ref, DetectSettings(s3=None, crop_px=96), {"status": "ok"})
    # cell, slide row, cell: the slide row in the middle of a caption batch
    batch = {k: np.concatenate([cells[k][:1], slide[k], cells[k][1:2]]) for k in cells}
    out = stage(batch)
    assert set(OUTPUT_KEYS) <= set(out)
    assert math.isnan(out["cell_type_confidence"][1])  # the slide row
    base = dict.fromkeys(
        ("run_id", "model_id", "model_version", "pipeline_version", "schema_version"), "r"
    )
    table = cells_table(out, np.array([0, 2]), base)
    confs = table.column("cell_type_confidence").to_pylist()
    for i, conf, cell_type in zip((0, 2), confs, table.column("cell_type").to_pylist()):
        if cell_type is None:
            assert conf is None
        else:
            assert isinstance(conf, float) and 0.0 <= conf <= 1.0
            assert conf == pytest.approx(out["cell_type_confidence"][i])
    assert table.schema.field("cell_type_confidence").metadata[b"unit"] == b"probability (0-1)"
    assert table.schema == CELL_SCHEMA
    # NaN in the batch (no type named) becomes null in the table, never NaN
    out["cell_type_confidence"][0] = np.nan
    assert cells_table(out, np.array([0]), base).column("cell_type_confidence").to_pylist() == [
        None
    ]
