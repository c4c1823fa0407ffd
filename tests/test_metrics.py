"""Metrics (hand-computed cases), the evaluation report and its Markdown, the evaluate CLI."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from hemblip.captions import render_caption
from hemblip.data import CaptionSample
from hemblip.evaluate import evaluate_captions, render_markdown
from hemblip.metrics import (
    NONE_LABEL,
    attribute_metrics,
    baseline_caption,
    bertscore,
    bleu,
    cell_type_metrics,
    exact_match,
    majority_labels,
    rouge_l,
    score_captions,
)
from hemblip.ontology import ATTRIBUTE_NAMES

pytestmark = pytest.mark.unit

FIXTURE = Path(__file__).parent / "fixtures" / "leukemia_attri"


def test_bleu_and_rouge_known_values():
    ref = "This is a lymphocyte from a healthy case, noted for its small size."
    assert bleu([ref], [ref.upper()]) == pytest.approx(1.0)  # lower-cased before splitting
    assert bleu([ref], ["completely unrelated words here"]) < 0.05
    assert bleu([ref], [""]) == 0.0
    half = bleu([ref, ref], [ref, ""])
    assert half == pytest.approx(0.5)  # averaged over samples
    # 3 of 4 words in order: LCS 3, P = R = 3/4 -> F = 0.75; stemming makes "cells" == "cell"
    assert rouge_l(["a large white cell"], ["a large white dog"]) == pytest.approx(0.75)
    assert rouge_l(["white cells"], ["white cell"]) == pytest.approx(1.0)
    assert bleu([], []) is None and rouge_l([], []) is None
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        bleu([ref, ref], [ref])


def test_bleu_is_nltk_sentence_bleu_method4():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    ref, hyp = "a b c d e f", "a b c x e f"
    expected = sentence_bleu(
        [ref.split()], hyp.split(), smoothing_function=SmoothingFunction().method4
    )
    assert bleu([ref], [hyp]) == pytest.approx(expected) and 0 < expected < 1


def test_attribute_metrics_hand_computed():
    refs = [{"cell_size": "big"}, {"cell_size": "big"}, {"cell_size": "small"}, {"cell_size": None}]
    preds = [{"cell_size": "big"}, {"cell_size": None}, {"cell_size": "big"}, {"cell_size": None}]
    m = attribute_metrics(refs, preds, names=["cell_size"])["cell_size"]
    assert m["n"] == 4 and m["n_mentioned"] == 3
    assert m["accuracy_all"] == pytest.approx(2 / 4)  # cell 1 and cell 4 (both unmentioned) agree
    assert m["accuracy_mentioned"] == pytest.approx(1 / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 0 / 1) / 2)
    none = attribute_metrics(refs, preds, names=["nucleolus"])["nucleolus"]
    assert (
        none["n_mentioned"] == 0
        and none["accuracy_mentioned"] is None
        and none["accuracy_all"] == 1.0
    )


def test_exact_match_and_cell_types():
    refs = [{"a": "x", "b": "y"}, {"a": "x", "b": None}, {"a": None, "b": None}]
    preds = [{"a": "x", "b": "z"}, {"a": "x", "b": "q"}, {"a": "w"}]
    assert exact_match(refs, preds) == (0.5, 2)
    m = cell_type_metrics(
        ["neutrophil", "neutrophil", "basophil", None], ["neutrophil", None, "monocyte", "x"]
    )
    assert m["accuracy"] == pytest.approx(1 / 3) and m["n"] == 3
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 0) / 2)
    conf = m["confusion"]
    assert conf["labels"] == ["neutrophil", "basophil", "monocyte"]
    assert conf["columns"][-1] == NONE_LABEL
    assert conf["matrix"] == [[1, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]


def _s(i, ct, attrs, split=None, case="healthy"):
    return CaptionSample(
        np.zeros((4, 4, 3), np.uint8),
        render_caption(ct, case, attrs),
        ct,
        case,
        attrs,
        f"c{i}",
        "t",
        split,
    )


def _cells():
    return [
        _s(
            0, "neutrophil", {"cell_size": "big", "granule_type": "small", "granule_colour": "pink"}
        ),
        _s(
            1, "neutrophil", {"cell_size": "big", "granule_type": "small", "granule_colour": "pink"}
        ),
        _s(2, "lymphocyte", {"cell_size": "small", "granule_type": "nil", "granule_colour": "nil"}),
        _s(
            3,
            "basophil",
            {"cell_size": "big", "granule_type": "coarse", "granule_colour": "purple"},
        ),
        _s(4, "monocyte", {}, case=None),
    ]


def test_majority_baseline_caption():
    cells = _cells()
    m = majority_labels(
        [{"cell_type": c.cell_type, "case": c.case, "attributes": c.attributes} for c in cells]
    )
    assert m["cell_type"] == "neutrophil" and m["case"] == "healthy"
    assert m["attributes"]["cell_size"] == "big" and m["attributes"]["nucleolus"] is None
    assert baseline_caption(
        [{"cell_type": c.cell_type, "case": c.case, "attributes": c.attributes} for c in cells]
    ) == ("This is a neutrophil from a healthy case, noted for its big size, small pink granules.")


def test_evaluate_captions_report_and_markdown():
    cells = _cells()
    perfect = evaluate_captions(
        cells,
        [c.caption for c in cells],
        train_samples=cells[:2],
        model_name="oracle",
        with_bertscore=False,
    )
    model, base = perfect["rows"]
    assert model["name"] == "oracle" and base["name"] == "majority baseline"
    assert model["bleu"] == pytest.approx(1.0) and model["rouge_l"] == pytest.approx(1.0)
    assert model["cell_type"]["accuracy"] == 1.0 and model["exact_match"] == 1.0
    assert model["mean_balanced_accuracy"] == 1.0 and model["case_accuracy"] == 1.0
    assert model["attributes"]["cell_size"]["n_mentioned"] == 4
    assert perfect["baseline"]["source"] == "training split (2 cells)"
    # baseline always says neutrophil/big/small pink: 2 of 5 types, 3 of 4 sizes right
    assert base["cell_type"]["accuracy"] == pytest.approx(2 / 5)
    assert base["attributes"]["cell_size"]["accuracy_mentioned"] == pytest.approx(3 / 4)
    assert base["attributes"]["cell_size"]["balanced_accuracy"] == pytest.approx(0.5)
    assert base["exact_match"] == pytest.approx(2 / 4) and base["bleu"] < 1.0
    # cell_size 0.5, granule_type (1 + 0 + 0) / 3, granule_colour likewise
    assert base["mean_balanced_accuracy_wbcatt"] == pytest.approx((0.5 + 1 / 3 + 1 / 3) / 3)
    md = render_markdown(perfect)
    assert "| oracle | 1.000 | 1.000 | n/a | 1.000 | 1.000 | 1.000 | 1.000 |" in md
    assert "BERTScore n/a: not requested." in md
    assert "| Model | cell_size | granule_type | granule_colour |" in md
    assert "| neutrophil | 2 | 0 | 0 | 0 | 0 |" in md  # confusion row
    json.dumps(perfect)  # JSON-serialisable

    garbled = evaluate_captions(cells, ["the the cell"] * 5, with_bertscore=False)
    g = garbled["rows"][0]
    assert g["cell_type"]["accuracy"] == 0.0 and g["exact_match"] == 0.0
    assert g["attributes"]["cell_size"]["accuracy_mentioned"] == 0.0
    assert garbled["baseline"]["source"].startswith("evaluated set")
    with pytest.raises(ValueError, match="5 samples but 1 predictions"):
        evaluate_captions(cells, ["x"])


def test_score_captions_parses_references_when_no_labels():
    ref = render_caption("eosinophil", "healthy", {"cell_size": "small", "granule_colour": "red"})
    hyp = render_caption("eosinophil", "healthy", {"cell_size": "big", "granule_colour": "red"})
    r = score_captions([ref], [hyp], with_bertscore=False)
    assert r["attributes"]["cell_size"]["accuracy_mentioned"] == 0.0
    assert r["attributes"]["granule_colour"]["accuracy_mentioned"] == 1.0
    assert r["exact_match"] == 0.0 and r["cell_type"]["accuracy"] == 1.0
    assert set(r["attributes"]) == set(ATTRIBUTE_NAMES)


def test_bertscore_reports_why_it_is_missing():
    score, reason = bertscore(["a"], ["a"])
    if importlib.util.find_spec("bert_score") is None:
        assert score is None and reason == "package bert_score not installed"
    else:  # installed: either a real score or the reason its model is not cached
        assert (score is not None and math.isfinite(score)) or "not available locally" in reason


def test_evaluate_cli_with_real_captioner(tmp_path):
    if importlib.util.find_spec("hemblip.inference") is None:
        pytest.skip("hemblip.inference (the Captioner) is not in this tree yet")
    from hemblip.inference import DEMO_CHECKPOINT

    if not DEMO_CHECKPOINT.is_dir():
        pytest.skip(f"no demo checkpoint at {DEMO_CHECKPOINT} yet")
    from hemblip.__main__ import main

    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    rc = main(
        [
            "evaluate",
            "--data",
            str(FIXTURE / "annotations.json"),
            "--no-bertscore",
            "--json",
            str(out_json),
            "--markdown",
            str(out_md),
            "--batch-size",
            "2",
        ]
    )
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert report["n_samples"] == 3 and report["rows"][0]["name"] == report["model"]["id"]
    assert 0.0 <= report["rows"][0]["bleu"] <= 1.0
    assert "**Table 1: caption quality**" in out_md.read_text()


def test_evaluate_cli_bad_input_is_one_line_error(tmp_path, capsys):
    from hemblip.__main__ import main

    assert main(["evaluate", "--data", str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: ")
        and "missing.csv: dataset file not found" in err
        and "\n" not in err
    )
    assert main(["evaluate", "--data", str(tmp_path), "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err


def test_evaluate_with_a_real_untrained_tiny_model(tmp_path):
    model_mod = pytest.importorskip("hemblip.model")
    if (
        not hasattr(model_mod, "build_model")
        or importlib.util.find_spec("hemblip.inference") is None
    ):
        pytest.skip("model building / Captioner not in this tree yet")
    from hemblip.__main__ import main

    loaded = model_mod.build_model("tiny", seed=0)
    model_mod.save_model(loaded.model, loaded.image_processor, loaded.tokenizer, tmp_path / "tiny")
    out_json = tmp_path / "r.json"
    rc = main(
        [
            "evaluate",
            "--model",
            str(tmp_path / "tiny"),
            "--data",
            str(FIXTURE / "annotations.json"),
            "--no-bertscore",
            "--json",
            str(out_json),
            "--batch-size",
            "3",
            "--max-new-tokens",
            "6",
        ]
    )
    assert rc == 0
    report = json.loads(out_json.read_text())
    model_row, base_row = report["rows"]
    assert report["n_samples"] == 3 and model_row["name"] == str(tmp_path / "tiny")
    assert report["model"]["version"] and len(report["model"]["version"]) == 16
    assert 0.0 <= model_row["bleu"] <= 1.0 and model_row["mean_logprob"] < 0
    assert len(report["examples"]) == 3 and all(
        isinstance(e["prediction"], str) for e in report["examples"]
    )
    # the baseline row is computed from the same references, independent of the model
    assert base_row["n"] == 3 and report["baseline"]["source"].startswith("evaluated set")
