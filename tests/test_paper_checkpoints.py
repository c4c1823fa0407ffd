"""The paper's checkpoints plug in as they are (issue 12).

A BLIP base saved with ``BlipProcessor.save_pretrained`` (transformers 5 writes
``processor_config.json``, no ``preprocessor_config.json``) and a peft LoRA adapter saved with
``PeftModel.save_pretrained`` whose ``base_model_name_or_path`` names the hub base
(``Salesforce/blip-image-captioning-base``) are simulated offline with a tiny BLIP of the same
architecture. No test contacts a hub: ``HF_HUB_OFFLINE=1`` is set for every test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from hemblip.errors import CheckpointError, HemblipConfigError  # noqa: E402
from hemblip.lora import LoraSettings, apply_lora, save_adapter, trainable_share  # noqa: E402
from hemblip.model import build_model, is_config_spec, load_model, weights_version  # noqa: E402
from hemblip.tokenizer import encode_captions  # noqa: E402

pytestmark = pytest.mark.unit

HUB_BASE = "Salesforce/blip-image-captioning-base"
SPEC = "config:tiny,text_layers=3"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and len(text) < 600, text
    return text


def _save_paper_base(out: Path, seed: int = 0) -> Path:
    """A base saved the way transformers 5 users save BLIP: model + ``BlipProcessor``."""
    from transformers import BlipProcessor

    lm = build_model(SPEC, seed=seed)
    lm.model.save_pretrained(str(out))
    BlipProcessor(image_processor=lm.image_processor, tokenizer=lm.tokenizer).save_pretrained(
        str(out)
    )
    return out


def _inputs(tokenizer, size: int = 64):
    ids, mask, _ = encode_captions(tokenizer, ["This is a neutrophil.", "This is a basophil."], 32)
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)), ids, mask


def _logits(model, tokenizer):
    px, ids, mask = _inputs(tokenizer)
    with torch.no_grad():
        return model.eval()(pixel_values=px, input_ids=ids, attention_mask=mask).logits


def _nontrivial(peft_model) -> None:
    """LoRA B starts at zero: make the adapters (and a trained-in-full module) change the model."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            if n.endswith("modules_to_save.default.output.dense.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _paper_adapter(base_dir: Path, out: Path, settings: LoraSettings | None = None):
    """A peft adapter saved as the paper's code does: ``PeftModel.save_pretrained`` only, its
    ``base_model_name_or_path`` naming the hub base. Returns (adapter dir, unmerged logits)."""
    base = load_model(base_dir)
    pm = apply_lora(base.model, settings)
    _nontrivial(pm)
    pm.save_pretrained(str(out), safe_serialization=True)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = HUB_BASE
    cfg_path.write_text(json.dumps(cfg))
    return out, _logits(pm, base.tokenizer)


# --------------------------------------------------------------------------- processor_config.json


def test_base_saved_with_blip_processor_loads(tmp_path):
    d = _save_paper_base(tmp_path / "base")
    assert (d / "processor_config.json").is_file() and not (d / "preprocessor_config.json").exists()
    ref = build_model(SPEC, seed=0)
    got = load_model(d)
    assert got.image_processor.size["height"] == got.image_processor.size["width"] == 64
    assert list(got.image_processor.image_mean) == list(ref.image_processor.image_mean)
    assert torch.allclose(
        _logits(got.model, got.tokenizer), _logits(ref.model, ref.tokenizer), atol=1e-5
    )


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[1, 2]",
        b'{"processor_class": "BlipProcessor"}',
        b'{"image_processor": "BlipImageProcessor"}',
        b'{"image_processor": [1, 2]}',
    ],
)
def test_bad_processor_config_is_a_one_line_error(tmp_path, content):
    d = _save_paper_base(tmp_path / "base")
    (d / "processor_config.json").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_model(d)
    assert str(d / "processor_config.json") in _one_line(err.value)


def test_missing_both_processor_files_names_both(tmp_path):
    d = _save_paper_base(tmp_path / "base")
    (d / "processor_config.json").unlink()
    with pytest.raises(CheckpointError, match="preprocessor_config.json") as err:
        load_model(d)
    assert "processor_config.json" in _one_line(err.value).replace("preprocessor_config.json", "")


# --------------------------------------------------------------------------- --base override


def test_hub_named_adapter_with_local_base(tmp_path):
    base_dir = _save_paper_base(tmp_path / "blip-base-copy")
    adapter, unmerged = _paper_adapter(base_dir, tmp_path / "adapter")
    assert not (adapter / "hemblip_base.json").exists()
    # Without --base the hub base is needed: offline, a one-line error that says what to do.
    with pytest.raises(CheckpointError, match=HUB_BASE) as err:
        load_model(adapter)
    assert "--base" in _one_line(err.value)
    got = load_model(adapter, base=str(base_dir))
    assert got.merged_adapter
    assert torch.allclose(_logits(got.model, got.tokenizer), unmerged, atol=1e-4)
    # The version hashes base + adapter, as for an adapter that names its base itself.
    assert got.version == weights_version(
        [base_dir / "model.safetensors", adapter / "adapter_model.safetensors"]
    )
    other = _save_paper_base(tmp_path / "other-base", seed=5)
    assert load_model(adapter, base=str(other)).version != got.version


def test_base_override_wins_over_hemblip_base_json(tmp_path):
    base_dir = _save_paper_base(tmp_path / "b")
    adapter, unmerged = _paper_adapter(base_dir, tmp_path / "a")
    (adapter / "hemblip_base.json").write_text(json.dumps({"base": str(tmp_path / "gone")}))
    got = load_model(adapter, base=str(base_dir))
    assert torch.allclose(_logits(got.model, got.tokenizer), unmerged, atol=1e-4)


def test_base_override_of_a_full_checkpoint_is_refused(tmp_path):
    base_dir = _save_paper_base(tmp_path / "b")
    with pytest.raises(CheckpointError, match="--base") as err:
        load_model(base_dir, base=str(base_dir))
    _one_line(err.value)


def test_base_override_that_is_an_adapter_is_refused(tmp_path):
    base_dir = _save_paper_base(tmp_path / "b")
    adapter, _ = _paper_adapter(base_dir, tmp_path / "a")
    with pytest.raises(CheckpointError, match="adapter") as err:
        load_model(adapter, base=str(adapter))
    _one_line(err.value)


def test_caption_stage_passes_base(tmp_path):
    """The job's caption actor loads adapter + --base and checks the planned version."""
    import numpy as np

    from pipeline.job.stage_caption import CaptionStage

    base_dir = _save_paper_base(tmp_path / "b")
    adapter, _ = _paper_adapter(base_dir, tmp_path / "a")
    want = load_model(adapter, base=str(base_dir)).version
    stage = CaptionStage(
        str(adapter), batch_size=2, device="cpu", expected_version=want, base=str(base_dir)
    )
    assert stage.captioner.model_version == want
    out = stage(
        {
            "kind": np.array(["cell"], dtype=object),
            "slide_id": np.array(["s"], dtype=object),
            "crop": np.full((1, 64, 64, 3), 128, np.uint8),
            "record": np.array(["{}"], dtype=object),
            "thumbnail": np.array([b""], dtype=object),
        }
    )
    assert isinstance(out["caption"][0], str)
    with pytest.raises(CheckpointError, match="differs"):
        CaptionStage(
            str(adapter), batch_size=2, device="cpu", expected_version="0" * 16, base=str(base_dir)
        )


def test_job_config_and_cli_take_base(tmp_path):
    from pipeline.cli.run import add_arguments, overrides_from
    from pipeline.errors import ConfigError
    from pipeline.job.config import load_config
    from pipeline.job.plan import CaptionSettings

    cfg = load_config(
        None, {"input": "in", "output": "out", "model": "s3://b/adapter", "base": "/m/blip"}
    )
    assert cfg.base == "/m/blip" and cfg.to_json_dict()["base"] == "/m/blip"
    y = tmp_path / "job.yaml"
    y.write_text("input: in\noutput: out\nmodel: a\nbase: s3://b/blip-base\n")
    assert load_config(y).base == "s3://b/blip-base"
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--input", "i", "--output", "o", "--model", "a", "--base", "DIR"])
    assert overrides_from(args)["base"] == "DIR"
    assert CaptionSettings("a", "v", base="DIR").base == "DIR"
    for bad, why in [
        ({"base": "b"}, "--model"),
        ({"model": "a", "base": "http://h/x"}, "s3://"),
        ({"model": "a", "base": "s3://"}, "bucket"),
        ({"model": "a", "base": 5}, "string"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(None, {"input": "in", "output": "out", **bad})
        assert str(err.value).startswith("--base") and why in _one_line(err.value), str(err.value)


# --------------------------------------------------------------------------- relative base paths


def test_relative_base_written_at_training_loads_from_elsewhere(tmp_path, monkeypatch):
    """``save_adapter(base="ckpt")`` in one directory, loaded from another."""
    work = tmp_path / "work"
    base_dir = _save_paper_base(work / "ckpt")
    loaded = load_model(base_dir)
    pm = apply_lora(loaded.model)
    _nontrivial(pm)
    unmerged = _logits(pm, loaded.tokenizer)
    monkeypatch.chdir(work)
    save_adapter(pm, "run", "ckpt", loaded.image_processor, loaded.tokenizer)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    got = load_model(work / "run")
    assert torch.allclose(_logits(got.model, got.tokenizer), unmerged, atol=1e-4)
    # Stored absolute (the base is outside the adapter folder), in both pointers.
    assert json.loads((work / "run" / "hemblip_base.json").read_text())["base"] == str(
        base_dir.resolve()
    )
    assert json.loads((work / "run" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(base_dir.resolve())


def test_base_inside_the_adapter_folder_moves_with_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    base_dir = _save_paper_base(out / "base")
    loaded = load_model(base_dir)
    pm = apply_lora(loaded.model)
    _nontrivial(pm)
    unmerged = _logits(pm, loaded.tokenizer)
    save_adapter(pm, out, str(base_dir), loaded.image_processor, loaded.tokenizer)
    assert json.loads((out / "hemblip_base.json").read_text())["base"] == "base"
    moved = tmp_path / "moved" / "run"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    monkeypatch.chdir(tmp_path)
    got = load_model(moved)
    assert torch.allclose(_logits(got.model, got.tokenizer), unmerged, atol=1e-4)


@pytest.mark.parametrize("where", ["adapter_config", "hemblip_base"])
def test_relative_base_is_resolved_against_the_adapter_folder(tmp_path, monkeypatch, where):
    """Pointers written by older code or by peft (``base_model_name_or_path`` as loaded)."""
    base_dir = _save_paper_base(tmp_path / "models" / "blip")
    adapter, unmerged = _paper_adapter(base_dir, tmp_path / "models" / "adapters" / "a")
    if where == "adapter_config":
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = "../../blip"
        (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    else:
        (adapter / "hemblip_base.json").write_text(json.dumps({"base": "../../blip"}))
    monkeypatch.chdir(tmp_path)
    got = load_model(adapter)
    assert torch.allclose(_logits(got.model, got.tokenizer), unmerged, atol=1e-4)


def test_lora_training_with_a_relative_base_loads_from_elsewhere(tmp_path, monkeypatch):
    from test_train import TRAIN, VAL

    from hemblip.train import TrainConfig, train

    work = tmp_path / "work"
    _save_paper_base(work / "ckpt")
    monkeypatch.chdir(work)
    train(
        TrainConfig(
            out="run", base="ckpt", mode="lora", epochs=1, batch_size=4, augment=False, max_steps=1
        ),
        TRAIN,
        VAL,
        log=lambda m: None,
    )
    monkeypatch.chdir(tmp_path)
    assert load_model(work / "run").merged_adapter


# --------------------------------------------------------------------------- adapters-only


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return list(fh.keys())


def test_adapters_only_saves_only_lora_tensors_and_loads_back(tmp_path):
    base_dir = _save_paper_base(tmp_path / "b")
    loaded = load_model(base_dir)
    settings = LoraSettings(save="adapters-only")
    pm = apply_lora(loaded.model, settings)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # Adapters on the cross-attention of every decoder layer (none is trained in full).
    for i in range(3):
        assert any(f"encoder.layer.{i}.crossattention.self.query.lora_A" in n for n in trainable), i
    _nontrivial(pm)
    unmerged = _logits(pm, loaded.tokenizer)
    out = tmp_path / "adapter"
    save_adapter(pm, out, str(base_dir), loaded.image_processor, loaded.tokenizer)
    names = _tensor_names(out / "adapter_model.safetensors")
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), names
    got = load_model(out)
    assert torch.allclose(_logits(got.model, got.tokenizer), unmerged, atol=1e-4)


def test_paper_default_still_saves_modules_in_full(tmp_path):
    base_dir = _save_paper_base(tmp_path / "b")
    loaded = load_model(base_dir)
    out = tmp_path / "adapter"
    save_adapter(apply_lora(loaded.model), out, str(base_dir))
    names = _tensor_names(out / "adapter_model.safetensors")
    assert any("word_embeddings" in n for n in names) and any(
        "encoder.layer.2." in n for n in names
    )


def test_adapters_only_share_on_blip_base():
    """BLIP-base sizes (meta device): the paper default ~19.5 %, adapters-only well under 1 %."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    with torch.device("meta"):
        paper = BlipForConditionalGeneration(BlipConfig())
        small = BlipForConditionalGeneration(BlipConfig())
    assert 0.15 < trainable_share(apply_lora(paper))[2] < 0.25
    t, _, share = trainable_share(apply_lora(small, LoraSettings(save="adapters-only")))
    assert share < 0.005 and t * 4 < 4e6  # a few MB of float32


def test_adapters_only_settings_are_checked():
    with pytest.raises(HemblipConfigError, match="--lora-save"):
        LoraSettings(save="everything")
    with pytest.raises(HemblipConfigError, match="--lora-full-layers"):
        LoraSettings(save="adapters-only", full_layers=2)


def test_train_cli_adapters_only(tmp_path, capsys):
    from test_train import TRAIN, VAL

    from hemblip.__main__ import main
    from hemblip.data import write_generic_csv

    data = tmp_path / "data"
    write_generic_csv(TRAIN + VAL, data)
    rc = main(
        [
            "train",
            "--data",
            str(data),
            "--base",
            SPEC,
            "--mode",
            "lora",
            "--lora-save",
            "adapters-only",
            "--out",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--max-steps",
            "1",
            "--no-augment",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < summary["trainable_share"] < 0.05
    names = _tensor_names(tmp_path / "run" / "adapter_model.safetensors")
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert load_model(tmp_path / "run").merged_adapter
    rc = main(
        [
            "train",
            "--data",
            str(data),
            "--base",
            SPEC,
            "--mode",
            "lora",
            "--lora-save",
            "adapters-only",
            "--lora-full-layers",
            "1",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2 and "--lora-full-layers" in capsys.readouterr().err


# --------------------------------------------------------------------------- random demo shape


def test_demo_shape_spec_cannot_pass_for_the_bundled_checkpoint():
    lm = build_model("random-demo-shape")
    assert lm.location == "config:random-demo-shape"
    assert lm.image_processor.size["height"] == 112
    assert is_config_spec("random-demo-shape")
    for spec in ("demo", "config:demo", "config:demo,text_layers=1"):
        with pytest.raises(HemblipConfigError, match="random-demo-shape") as err:
            load_model(spec)
        assert "demo_checkpoint" in _one_line(err.value)


def test_train_cli_base_demo_is_refused_with_a_hint(tmp_path, capsys):
    from test_train import TRAIN, VAL

    from hemblip.__main__ import main
    from hemblip.data import write_generic_csv

    data = tmp_path / "data"
    write_generic_csv(TRAIN + VAL, data)
    rc = main(
        [
            "train",
            "--data",
            str(data),
            "--base",
            "demo",
            "--out",
            str(tmp_path / "x"),
            "--epochs",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "random-demo-shape" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- --base in the CLIs and the driver
# (needs the --base changes in hemblip/inference.py, hemblip/cli/caption.py, hemblip/cli/evaluate.py,
#  pipeline/job/run.py)


def test_caption_and_evaluate_cli_take_base(tmp_path, capsys):
    from PIL import Image
    from test_train import TRAIN, VAL

    from hemblip.__main__ import main
    from hemblip.data import write_generic_csv

    base_dir = _save_paper_base(tmp_path / "b")
    adapter, _ = _paper_adapter(base_dir, tmp_path / "a")
    want = load_model(adapter, base=str(base_dir)).version
    img = tmp_path / "cell.png"
    Image.fromarray(TRAIN[0].image).save(img)
    rc = main(
        ["caption", str(img), "--model", str(adapter), "--base", str(base_dir), "--device", "cpu"]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out.strip().splitlines()[-1])["model_version"] == want
    rc = main(["caption", str(img), "--model", str(adapter), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and HUB_BASE in err and "--base" in err
    data = tmp_path / "data"
    write_generic_csv(TRAIN + VAL, data)
    report = tmp_path / "r.json"
    rc = main(
        [
            "evaluate",
            "--model",
            str(adapter),
            "--base",
            str(base_dir),
            "--data",
            str(data),
            "--limit",
            "2",
            "--no-bertscore",
            "--device",
            "cpu",
            "--json",
            str(report),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert json.loads(report.read_text())["model"]["version"] == want


def test_model_identity_hashes_the_base_given(tmp_path):
    from hemblip import Captioner
    from pipeline.errors import ConfigError
    from pipeline.job.run import model_identity

    base_dir = _save_paper_base(tmp_path / "b")
    adapter, _ = _paper_adapter(base_dir, tmp_path / "a")
    model_id, version = model_identity(str(adapter), None, str(base_dir))
    assert version == load_model(adapter, base=str(base_dir)).version
    assert str(adapter) in model_id and str(base_dir) in model_id
    with pytest.raises(ConfigError, match="--base") as err:
        model_identity(str(adapter), None)
    assert HUB_BASE in _one_line(err.value)
    with pytest.raises(HemblipConfigError, match="--base"):
        Captioner(None, device="cpu", base=str(base_dir))
