"""LoRA (peft): which modules adapt/train, trainable share, adapter save/load/merge equivalence."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from hemblip.errors import CheckpointError, HemblipConfigError  # noqa: E402
from hemblip.lora import (  # noqa: E402
    LoraSettings,
    apply_lora,
    load_adapter,
    save_adapter,
    trainable_share,
)
from hemblip.model import build_model, load_model, save_model  # noqa: E402
from hemblip.tokenizer import encode_captions  # noqa: E402

pytestmark = pytest.mark.unit

SPEC = "config:tiny,text_layers=3"  # 1 adapted layer + the last 2 trained in full


@pytest.fixture()
def base(tmp_path):
    lm = build_model(SPEC)
    save_model(lm.model, lm.image_processor, lm.tokenizer, tmp_path / "base")
    return load_model(tmp_path / "base"), tmp_path / "base"


def _inputs(tokenizer):
    ids, mask, _ = encode_captions(tokenizer, ["This is a neutrophil.", "This is a basophil."], 32)
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), ids, mask


def test_lora_targets_and_frozen_parts(base):
    pm = apply_lora(base[0].model)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert lora, "no LoRA parameters"
    # Adapters only on decoder layer 0's cross-attention query/key/value/output.dense.
    for n in lora:
        assert ".text_decoder.bert.encoder.layer.0.crossattention." in n, n
    for part in ("self.query", "self.key", "self.value", "output.dense"):
        assert any(f"crossattention.{part}.lora_A" in n for n in lora), part
    assert not any("vision_model" in n for n in trainable)
    full = {n for n in trainable if "modules_to_save" in n}
    for part in (
        "embeddings.word_embeddings",
        "embeddings.position_embeddings",
        "embeddings.LayerNorm",
        "text_decoder.cls",
        "encoder.layer.1.",
        "encoder.layer.2.",
    ):
        assert any(part in n for n in full), part
    assert not any("encoder.layer.0." in n for n in full)
    # Self-attention of the adapted layer stays frozen.
    assert not any("layer.0.attention" in n for n in trainable)
    t, total, share = trainable_share(pm)
    assert 0 < t < total and 0.0 < share < 1.0
    # The LM head stays tied to the word embeddings inside the trained copies.
    dec = pm.base_model.model.text_decoder
    assert (
        dec.cls.modules_to_save["default"].predictions.decoder.weight
        is dec.bert.embeddings.word_embeddings.modules_to_save["default"].weight
    )


def test_trainable_share_blip_base_architecture():
    """BLIP-base sizes (random, meta device: no memory, no download)."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    with torch.device("meta"):
        model = BlipForConditionalGeneration(BlipConfig())
    t, total, share = trainable_share(apply_lora(model))
    assert 200e6 < total < 260e6
    assert 0.10 < share < 0.30  # embeddings + LM head + last 2 layers + adapters


def test_settings_validate_flags():
    with pytest.raises(HemblipConfigError, match="--lora-r"):
        LoraSettings(r=0)
    with pytest.raises(HemblipConfigError, match="--lora-dropout"):
        LoraSettings(dropout=1.5)
    with pytest.raises(HemblipConfigError, match="--lora-full-layers"):
        apply_lora(build_model("tiny").model, LoraSettings(full_layers=2))  # 2 layers: none left


def test_adapter_save_load_merge_equivalence(base, tmp_path):
    loaded, base_dir = base
    px, ids, mask = _inputs(loaded.tokenizer)
    with torch.no_grad():
        ref = loaded.model.eval()(
            pixel_values=px, input_ids=ids, attention_mask=mask
        ).logits.clone()
    pm = apply_lora(loaded.model)
    # Make the adapters and a fully trained module non-trivial (B starts at zero).
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            if n.endswith("layer.2.modules_to_save.default.output.dense.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    with torch.no_grad():
        unmerged = pm(pixel_values=px, input_ids=ids, attention_mask=mask).logits
    assert (unmerged - ref).abs().max() > 1e-2  # the adapter changes the model
    out = tmp_path / "adapter"
    save_adapter(pm, out, str(base_dir), loaded.image_processor, loaded.tokenizer)
    assert (out / "adapter_model.safetensors").is_file() and (out / "hemblip_base.json").is_file()
    assert not list(out.glob("*.bin"))
    again = load_model(out)  # merges on load
    assert again.merged_adapter and type(again.model).__name__ == "BlipForConditionalGeneration"
    assert not any("lora" in n for n, _ in again.model.named_parameters())
    with torch.no_grad():
        merged = again.model(pixel_values=px, input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(merged, unmerged, atol=1e-4)
    assert len(again.version) == 16
    # A fresh base with the adapter attached but not merged gives the same outputs too.
    fresh = load_model(base_dir).model
    peft_model = load_adapter(fresh, out, merge=False).eval()
    with torch.no_grad():
        attached = peft_model(pixel_values=px, input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(attached, unmerged, atol=1e-4)


def test_adapter_without_base_or_weights(tmp_path, base):
    loaded, base_dir = base
    pm = apply_lora(loaded.model)
    out = tmp_path / "a"
    save_adapter(pm, out, str(tmp_path / "gone"))
    with pytest.raises(CheckpointError, match="gone"):
        load_model(out)
    (out / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        load_model(out)
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        load_adapter(loaded.model, tmp_path)
