"""BERTScore never reaches for the network: a local model directory or n/a at once.

The real ``bert_score`` package is not installed here and cannot be installed offline, so these
tests put a stand-in module object into ``sys.modules["bert_score"]``. That is a test of our
control flow (whether and how we call the package), not of BERTScore itself: the stand-in records
every attribute looked up on it, so "never imported / never called" is checked directly.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path

import pytest

from hemblip.errors import HemblipConfigError
from hemblip.metrics import bertscore, check_bertscore_model, score_captions

pytestmark = pytest.mark.unit

FIXTURE = Path(__file__).parent / "fixtures" / "leukemia_attri"


class _Mean:
    def __init__(self, value: float):
        self.value = value

    def mean(self) -> float:
        return self.value


class _FakeBertScore(types.ModuleType):
    """Stands in for the ``bert_score`` package; ``touched`` lists every name looked up on it."""

    def __init__(self, *, allow_score: bool):
        super().__init__("bert_score")
        self.__spec__ = importlib.machinery.ModuleSpec("bert_score", None)
        self.touched: list[str] = []
        self.calls: list[dict] = []
        self._allow = allow_score

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        self.touched.append(name)
        if name != "score" or not self._allow:
            raise AssertionError(f"bert_score.{name} used although it must not be")

        def score(cands, refs, **kwargs):
            from huggingface_hub import constants

            self.calls.append(
                {
                    "cands": list(cands),
                    "refs": list(refs),
                    **kwargs,
                    "offline_const": constants.HF_HUB_OFFLINE,
                    "offline_env": os.environ.get("HF_HUB_OFFLINE"),
                }
            )
            return _Mean(0.5), _Mean(0.5), _Mean(0.875)

        return score


@pytest.fixture
def fake_bert_score(monkeypatch):
    def install(allow_score: bool = False) -> _FakeBertScore:
        fake = _FakeBertScore(allow_score=allow_score)
        utils = types.ModuleType("bert_score.utils")
        utils.__spec__ = importlib.machinery.ModuleSpec("bert_score.utils", None)
        utils.model2layers = {"roberta-large": 17}
        monkeypatch.setitem(sys.modules, "bert_score", fake)
        monkeypatch.setitem(sys.modules, "bert_score.utils", utils)
        return fake

    return install


def _model_dir(root: Path, name: str = "my-bert") -> Path:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "roberta", "num_hidden_layers": 24}))
    (d / "model.safetensors").write_bytes(b"")
    return d


def test_without_a_model_path_it_is_na_at_once_and_never_touches_bert_score(
    fake_bert_score, monkeypatch
):
    fake = fake_bert_score()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    score, reason = bertscore(["a lymphocyte"], ["a lymphocyte"])
    assert score is None and "--bertscore-model" in reason
    row = score_captions(["a lymphocyte"], ["a monocyte"])
    assert row["bertscore"] is None and "--bertscore-model" in row["bertscore_reason"]
    assert fake.touched == []
    # no process-wide side effect either: the environment is as it was
    assert "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ


def test_with_a_local_model_it_scores_offline_and_restores_the_hub_setting(
    fake_bert_score, monkeypatch, tmp_path
):
    from huggingface_hub import constants

    fake = fake_bert_score(allow_score=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = _model_dir(tmp_path, "roberta-large")
    score, reason = bertscore(["ref one", "ref two"], ["hyp one", "hyp two"], model_path=model)
    assert (score, reason) == (0.875, None)
    (call,) = fake.calls
    assert (
        call["model_type"] == str(model) and call["num_layers"] == 17
    )  # bert_score's layer by name
    assert "lang" not in call or call["lang"] is None
    assert call["offline_const"] is True and call["offline_env"] == "1"
    assert constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ
    # an explicit layer wins; a name bert_score does not know needs one
    other = _model_dir(tmp_path)
    assert bertscore(["r"], ["h"], model_path=other, num_layers=9) == (0.875, None)
    assert fake.calls[-1]["num_layers"] == 9
    score, reason = bertscore(["r"], ["h"], model_path=other)
    assert score is None and "--bertscore-layers" in reason


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda root: root / "missing", "no such directory"),
        (lambda root: (root / "file.txt").write_text("x") and root / "file.txt", "not a directory"),
        (lambda root: (root / "empty").mkdir() or root / "empty", "no config.json"),
        (lambda root: _pickle_only(root), "safetensors"),
        (lambda root: root / "bad\nname", "no such directory"),
    ],
)
def test_a_bad_model_path_is_a_one_line_error(fake_bert_score, tmp_path, make, why):
    fake = fake_bert_score()
    path = make(tmp_path)
    with pytest.raises(HemblipConfigError) as info:
        bertscore(["a"], ["a"], model_path=path)
    msg = str(info.value)
    assert why in msg and "--bertscore-model" in msg and "\n" not in msg
    assert fake.touched == []
    with pytest.raises(HemblipConfigError):
        check_bertscore_model(path)


def _pickle_only(root: Path) -> Path:
    d = root / "pickled"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"")
    return d


def test_evaluate_cli_checks_the_bertscore_model_before_any_work(fake_bert_score, tmp_path, capsys):
    from hemblip.__main__ import main

    fake = fake_bert_score()
    # --model is not a checkpoint either: the BERTScore path must be refused first, at once
    rc = main(
        [
            "evaluate",
            "--data",
            str(FIXTURE / "annotations.json"),
            "--model",
            str(tmp_path),
            "--bertscore-model",
            str(tmp_path / "nope"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert (
        rc == 2 and err.startswith("error: --bertscore-model") and "nope" in err and "\n" not in err
    )
    rc = main(
        [
            "evaluate",
            "--data",
            str(FIXTURE / "annotations.json"),
            "--no-bertscore",
            "--bertscore-model",
            str(_model_dir(tmp_path)),
        ]
    )
    assert rc == 2 and "--no-bertscore" in capsys.readouterr().err
    assert fake.touched == []
