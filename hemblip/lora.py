"""LoRA fine-tuning of the BLIP text decoder with peft (the HemBLIP paper code's defaults).

Adapters (r=8, alpha=16, dropout 0.05) sit on the decoder's cross-attention query/key/value and
output dense layers, i.e. where text attends to the image; the vision tower stays frozen. The
LM head, word/position embeddings, embedding LayerNorm and the last ``full_layers`` (2) decoder
layers are trained in full (peft ``modules_to_save``). Cross-attention of those last layers is
trained in full too, so adapters go only on the layers below them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from hemblip.errors import CheckpointError, HemblipConfigError

__all__ = [
    "LoraSettings",
    "apply_lora",
    "load_adapter",
    "merge_adapter",
    "save_adapter",
    "trainable_share",
]

_DECODER_LAYERS = "text_decoder.bert.encoder.layer"


@dataclass(frozen=True)
class LoraSettings:
    """peft LoRA settings; defaults are the HemBLIP paper code's."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    full_layers: int = 2  # last decoder layers trained in full

    def __post_init__(self) -> None:
        if self.r < 1:
            raise HemblipConfigError(f"--lora-r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise HemblipConfigError(f"--lora-alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise HemblipConfigError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if self.full_layers < 0:
            raise HemblipConfigError(f"--lora-full-layers must be >= 0, got {self.full_layers}")


def _targets(n_layers: int, settings: LoraSettings) -> tuple[list[str], list[str]]:
    """(LoRA target module names, modules_to_save names) for a decoder with ``n_layers``."""
    adapted = range(0, n_layers - settings.full_layers)
    if not adapted:
        raise HemblipConfigError(
            f"--lora-full-layers {settings.full_layers} leaves no decoder layer for adapters "
            f"(the model has {n_layers})")
    targets = [f"{_DECODER_LAYERS}.{i}.crossattention.{m}" for i in adapted
               for m in ("self.query", "self.key", "self.value", "output.dense")]
    full = [
        "text_decoder.bert.embeddings.word_embeddings",
        "text_decoder.bert.embeddings.position_embeddings",
        "text_decoder.bert.embeddings.LayerNorm",
        "text_decoder.cls",
        *(f"{_DECODER_LAYERS}.{i}" for i in range(n_layers - settings.full_layers, n_layers)),
    ]
    return targets, full


def apply_lora(model, settings: LoraSettings | None = None):
    """Wrap a ``BlipForConditionalGeneration`` in a peft ``PeftModel`` with LoRA adapters.

    Only adapter weights and ``modules_to_save`` are trainable afterwards (vision tower frozen).
    """
    from peft import LoraConfig, get_peft_model

    settings = settings or LoraSettings()
    n_layers = model.config.text_config.num_hidden_layers
    targets, full = _targets(n_layers, settings)
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=targets, modules_to_save=full, bias="none",
    )
    peft_model = get_peft_model(model, config)
    _tie_trained_copies(peft_model)
    for p in peft_model.base_model.model.vision_model.parameters():
        p.requires_grad_(False)
    return peft_model


def _tie_trained_copies(peft_model) -> None:
    """Re-tie the LM head to the word embeddings inside peft's trainable copies.

    BLIP ties ``cls.predictions.decoder.weight`` to the word embeddings (and its bias to
    ``cls.predictions.bias``), but ``BlipForConditionalGeneration.get_output_embeddings()`` is
    None, so peft cannot see the tie and would train two diverging copies; a merged model saved
    with tied weights would then silently keep only one of them.
    """
    decoder = peft_model.base_model.model.text_decoder
    emb = decoder.bert.embeddings.word_embeddings
    cls = decoder.cls
    if not (hasattr(emb, "modules_to_save") and hasattr(cls, "modules_to_save")):
        return
    for name in emb.modules_to_save:
        if name in cls.modules_to_save:
            predictions = cls.modules_to_save[name].predictions
            predictions.decoder.weight = emb.modules_to_save[name].weight
            predictions.decoder.bias = predictions.bias


def trainable_share(model) -> tuple[int, int, float]:
    """``(trainable, total, trainable / total)`` parameter counts (each tensor counted once).

    For a peft model the frozen originals of ``modules_to_save`` are not counted in ``total``,
    so the share is that of the model that would be merged.
    """
    seen: set[int] = set()
    trainable = total = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if ".original_module." in name:
            continue
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total, trainable / total if total else 0.0


def save_adapter(peft_model, out_dir: str | os.PathLike, base: str, image_processor=None,
                 tokenizer=None) -> Path:
    """Write the adapter (``adapter_model.safetensors`` + ``adapter_config.json``) and a pointer
    to its base location (``hemblip_base.json``), plus processor/tokenizer files if given.

    ``base``: the base model location as :func:`hemblip.model.load_model` accepts it; a relative
    path is resolved against ``out_dir`` when loading. Returns the adapter weights path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model = getattr(peft_model, "module", peft_model)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    (out / "hemblip_base.json").write_text(json.dumps({"base": str(base)}) + "\n")
    if image_processor is not None:
        image_processor.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out / "adapter_model.safetensors"


def merge_adapter(peft_model):
    """Fold the adapters into the base weights; returns the plain ``BlipForConditionalGeneration``."""
    return peft_model.merge_and_unload()


def load_adapter(base_model, adapter_dir: str | os.PathLike, *, merge: bool = True,
                 trainable: bool = False):
    """Attach a saved adapter to ``base_model``; merged into a plain model when ``merge``."""
    from peft import PeftModel

    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise CheckpointError(f"{d}: not an adapter directory; missing adapter_config.json")
    peft_model = PeftModel.from_pretrained(base_model, str(d), is_trainable=trainable)
    _tie_trained_copies(peft_model)
    return merge_adapter(peft_model) if merge else peft_model
