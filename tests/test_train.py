"""Training loop: loss goes down, LoRA mode, resume, early stopping, config checks, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hemblip.captions import render_caption  # noqa: E402
from hemblip.data import CaptionSample, write_generic_csv  # noqa: E402
from hemblip.errors import HemblipConfigError  # noqa: E402
from hemblip.model import load_model  # noqa: E402
from hemblip.train import TrainConfig, train  # noqa: E402

pytestmark = pytest.mark.unit

_CLASSES = {
    "eosinophil": (
        (200, 80, 90),
        {"granule_colour": "red", "granule_type": "round", "cell_size": "big"},
    ),
    "lymphocyte": (
        (60, 50, 160),
        {"granule_colour": "nil", "granule_type": "nil", "cell_size": "small"},
    ),
}


def _samples(n_per_class: int, split: str) -> list[CaptionSample]:
    """Stained-looking discs on a pale background, one colour per class (deterministic)."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    yy, xx = np.mgrid[:48, :48]
    out = []
    for cell_type, (colour, attrs) in _CLASSES.items():
        for i in range(n_per_class):
            img = np.full((48, 48, 3), (235, 215, 215), np.float32)
            r = 10 + 6 * (attrs["cell_size"] == "big")
            disc = (yy - 24) ** 2 + (xx - 24) ** 2 < r * r
            img[disc] = colour
            img += rng.normal(0, 6, img.shape)
            image = np.clip(img, 0, 255).astype(np.uint8)
            out.append(
                CaptionSample(
                    image=image,
                    caption=render_caption(cell_type, "healthy", attrs),
                    cell_type=cell_type,
                    case="healthy",
                    attributes=dict(attrs),
                    sample_id=f"{split}-{cell_type}-{i}",
                    source="synthetic",
                    split=split,
                )
            )
    return out


TRAIN = _samples(4, "train")
VAL = _samples(1, "val")


def _config(tmp_path, **kw) -> TrainConfig:
    base = dict(
        out=str(tmp_path / "out"),
        base="tiny",
        epochs=3,
        batch_size=4,
        lr=5e-3,
        augment=False,
        log_every=1,
        seed=0,
        warmup_fraction=0.0,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_full_training_loss_decreases_and_saves(tmp_path):
    logs: list[str] = []
    result = train(_config(tmp_path, epochs=4), TRAIN, VAL, log=logs.append)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < 0.85 * losses[0], losses
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    assert result.trainable_share == 1.0
    assert any("step 1/2 loss" in m for m in logs) and any("val loss" in m for m in logs)
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 4
    loaded = load_model(out)
    assert loaded.model.config.text_config.bos_token_id == loaded.tokenizer.bos_token_id


def test_lora_training_writes_loadable_adapter(tmp_path):
    result = train(
        _config(tmp_path, base="config:tiny,text_layers=3", mode="lora", epochs=1),
        TRAIN,
        VAL,
        log=lambda m: None,
    )
    assert 0 < result.trainable_share < 1
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "base" / "model.safetensors").is_file()  # a config-spec base is kept
    loaded = load_model(out)
    assert loaded.merged_adapter and len(loaded.version) == 16


def test_resume_continues_at_next_epoch(tmp_path):
    first = train(_config(tmp_path, epochs=2), TRAIN, VAL, log=lambda m: None)
    assert first.epochs_run == 2
    state = json.loads((tmp_path / "out" / "_resume" / "state.json").read_text())
    assert state["epoch"] == 2 and state["step"] == 4
    logs: list[str] = []
    second = train(_config(tmp_path, epochs=3, resume=True), TRAIN, VAL, log=logs.append)
    assert any("after epoch 2 (step 4)" in m for m in logs)
    assert [h["epoch"] for h in second.history] == [1, 2, 3]
    assert second.history[:2] == first.history
    assert not any(m.startswith("epoch 1/") or m.startswith("epoch 2/") for m in logs)
    # Resuming a finished run does nothing more.
    third = train(_config(tmp_path, epochs=3, resume=True), TRAIN, VAL, log=lambda m: None)
    assert third.epochs_run == 3 and len(third.history) == 3


def test_resume_without_state_names_flag(tmp_path):
    with pytest.raises(HemblipConfigError, match="--resume"):
        train(_config(tmp_path, resume=True), TRAIN, VAL, log=lambda m: None)


def test_early_stopping_after_patience(tmp_path):
    # A learning rate far below float32 resolution leaves the validation loss unchanged.
    result = train(
        _config(tmp_path, epochs=6, lr=1e-30, patience=2), TRAIN, VAL, log=lambda m: None
    )
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1


def test_max_steps(tmp_path):
    result = train(_config(tmp_path, epochs=5, max_steps=3), TRAIN, VAL, log=lambda m: None)
    assert result.history[-1]["step"] == 3 and result.epochs_run == 2


@pytest.mark.parametrize(
    "kw, flag",
    [
        (dict(mode="half"), "--mode"),
        (dict(epochs=0), "--epochs"),
        (dict(batch_size=0), "--batch-size"),
        (dict(lr=0.0), "--lr"),
        (dict(warmup_fraction=1.0), "--warmup"),
        (dict(patience=0), "--patience"),
        (dict(weight_decay=-1.0), "--weight-decay"),
        (dict(workers=-1), "--workers"),
        (dict(out=""), "--out"),
        (dict(oversample={"x": 0}), "--oversample"),
        (dict(augment="scale,blur"), "--augment"),
        (dict(aug_scale=0.7), "--aug-scale"),
        (dict(aug_hue=-0.1), "--aug-hue"),
        (dict(aug_saturation=(1.2, 0.8)), "--aug-saturation"),
        (dict(aug_resolution_mpp=(0.0, 0.25)), "--aug-resolution-mpp"),
        (dict(aug_jpeg=(70, 101)), "--aug-jpeg"),
        (dict(context=0.5), "--context"),
        (dict(balance="weights"), "--balance"),
    ],
)
def test_config_errors_name_flag(tmp_path, kw, flag):
    with pytest.raises(HemblipConfigError, match=flag):
        _config(tmp_path, **kw)


def test_old_resume_state_with_boolean_augment_loads(tmp_path):
    # _resume/state.json written before augmentation kinds existed stores augment: true/false.
    old = _config(tmp_path).to_json()
    for key in (
        "aug_scale",
        "aug_hue",
        "aug_saturation",
        "aug_resolution_mpp",
        "aug_jpeg",
        "context",
        "balance",
    ):
        old.pop(key)
    assert (
        TrainConfig.from_json({**old, "augment": True}).augment
        == "geometry,scale,stain,resolution,jpeg"
    )
    assert TrainConfig.from_json({**old, "augment": False}).augment == ""


def test_train_cli_augment_flags(tmp_path, capsys):
    from hemblip.__main__ import main

    data = tmp_path / "data"
    write_generic_csv(TRAIN + VAL, data)
    rc = main(
        [
            "train",
            "--data",
            str(data),
            "--base",
            "tiny",
            "--out",
            str(tmp_path / "cli"),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--augment",
            "scale,stain,jpeg",
            "--aug-hue",
            "0.03",
            "--aug-jpeg",
            "80,90",
            "--balance",
            "class",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "augment scale,stain,jpeg, balance class" in out
    state = json.loads((tmp_path / "cli" / "_resume" / "state.json").read_text())
    assert state["config"]["aug_jpeg"] == [80.0, 90.0] and state["config"]["context"] == 1.2
    rc = main(
        ["train", "--data", str(data), "--out", str(tmp_path / "x"), "--aug-saturation", "0.8"]
    )
    assert rc == 2 and "--aug-saturation" in capsys.readouterr().err


def test_train_cli(tmp_path, capsys):
    from hemblip.__main__ import main

    data = tmp_path / "data"
    write_generic_csv(TRAIN + VAL, data)
    rc = main(
        [
            "train",
            "--data",
            str(data),
            "--base",
            "tiny",
            "--out",
            str(tmp_path / "cli"),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--no-augment",
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["epochs_run"] == 1 and summary["trainable_share"] == 1.0
    assert "8 train, 2 val" in lines[0]
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    rc = main(["train", "--data", str(data), "--out", str(tmp_path / "x"), "--epochs", "0"])
    assert rc == 2 and "--epochs" in capsys.readouterr().err
