"""LoRA fine-tuning of the BLIP text decoder with peft (the HemBLIP paper code's defaults).

Adapters (r=8, alpha=16, dropout 0.05) sit on the decoder's cross-attention query/key/value and
output dense layers, i.e. where text attends to the image; the vision tower stays frozen.

``save="paper"`` (default, the paper code's): the LM head, word/position embeddings, embedding
LayerNorm and the last ``full_layers`` (2) decoder layers are trained in full (peft
``modules_to_save``) and saved with the adapter: 19.5 % of BLIP-base, a 269 MB adapter file.
Cross-attention of those last layers is trained in full too, so adapters go only on the layers
below them. ``save="adapters-only"``: nothing is trained in full, adapters go on every decoder
layer's cross-attention, and the adapter file holds LoRA tensors only (0.26 % of BLIP-base,
about 2.4 MB).

Saved adapters are peft's format (``adapter_config.json`` + ``adapter_model.safetensors``) plus
``hemblip_base.json`` naming the base (see :func:`save_adapter`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hemblip.errors import CheckpointError, HemblipConfigError

__all__ = [
    "LoraSettings",
    "SAVE_MODES",
    "apply_lora",
    "base_pointers",
    "load_adapter",
    "merge_adapter",
    "save_adapter",
    "trainable_share",
]

_DECODER_LAYERS = "text_decoder.bert.encoder.layer"
#: What a LoRA run trains and saves besides the adapters (see the module docstring).
SAVE_MODES = ("paper", "adapters-only")
_PAPER_FULL_LAYERS = 2


@dataclass(frozen=True)
class LoraSettings:
    """peft LoRA settings; defaults are the HemBLIP paper code's.

    ``full_layers``: last decoder layers trained in full (``save="paper"`` only); None means 2
    in paper mode and 0 in adapters-only mode.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    full_layers: int | None = None
    save: str = "paper"

    @property
    def layers_in_full(self) -> int:
        """Decoder layers trained (and saved) in full."""
        if self.full_layers is not None:
            return self.full_layers
        return _PAPER_FULL_LAYERS if self.save == "paper" else 0

    def __post_init__(self) -> None:
        if self.save not in SAVE_MODES:
            raise HemblipConfigError(
                f"--lora-save must be one of {', '.join(SAVE_MODES)}, got {self.save!r}"
            )
        if self.save == "adapters-only" and self.full_layers:
            raise HemblipConfigError(
                f"--lora-full-layers {self.full_layers} applies to --lora-save paper only; "
                "adapters-only trains no layer in full"
            )
        if self.r < 1:
            raise HemblipConfigError(f"--lora-r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise HemblipConfigError(f"--lora-alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise HemblipConfigError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if self.full_layers is not None and self.full_layers < 0:
            raise HemblipConfigError(f"--lora-full-layers must be >= 0, got {self.full_layers}")


def _targets(n_layers: int, settings: LoraSettings) -> tuple[list[str], list[str]]:
    """(LoRA target module names, modules_to_save names) for a decoder with ``n_layers``."""
    in_full = settings.layers_in_full
    adapted = range(0, n_layers - in_full)
    if not adapted:
        raise HemblipConfigError(
            f"--lora-full-layers {in_full} leaves no decoder layer for adapters "
            f"(the model has {n_layers})"
        )
    targets = [
        f"{_DECODER_LAYERS}.{i}.crossattention.{m}"
        for i in adapted
        for m in ("self.query", "self.key", "self.value", "output.dense")
    ]
    if settings.save == "adapters-only":
        return targets, []
    full = [
        "text_decoder.bert.embeddings.word_embeddings",
        "text_decoder.bert.embeddings.position_embeddings",
        "text_decoder.bert.embeddings.LayerNorm",
        "text_decoder.cls",
        *(f"{_DECODER_LAYERS}.{i}" for i in range(n_layers - in_full, n_layers)),
    ]
    return targets, full


def apply_lora(model, settings: LoraSettings | None = None):
    """Wrap a ``BlipForConditionalGeneration`` in a peft ``PeftModel`` with LoRA adapters.

    Only adapter weights and ``modules_to_save`` (none with ``save="adapters-only"``) are
    trainable afterwards (vision tower frozen).
    """
    from peft import LoraConfig, get_peft_model

    settings = settings or LoraSettings()
    n_layers = model.config.text_config.num_hidden_layers
    targets, full = _targets(n_layers, settings)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        modules_to_save=full or None,
        bias="none",
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


def base_pointers(base: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[str, str]:
    """(``hemblip_base.json`` value, ``adapter_config.json`` ``base_model_name_or_path``) for a
    base location given as :func:`hemblip.model.load_model` accepts it.

    ``s3://`` URIs, config specs and hub ids (``org/name`` that is no local path) are kept as
    written. A local path (relative to the current directory) is stored, in
    ``hemblip_base.json``, relative to ``out_dir`` when the base lies inside it (so the two move
    together, e.g. ``OUT/base``) and absolute otherwise; peft's field always gets the absolute
    path, which peft itself would read relative to the current directory.
    """
    from hemblip.model import is_config_spec

    ref = os.fspath(base)
    local = Path(ref).expanduser()
    hub_id = ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
    if ref.startswith("s3://") or is_config_spec(ref) or (hub_id and not local.exists()):
        return ref, ref
    absolute = local.resolve()
    try:
        inside = absolute.relative_to(Path(out_dir).resolve())
    except ValueError:
        return str(absolute), str(absolute)
    return (inside.as_posix() or "."), str(absolute)


def save_adapter(
    peft_model, out_dir: str | os.PathLike, base: str, image_processor=None, tokenizer=None
) -> Path:
    """Write the adapter (``adapter_model.safetensors`` + ``adapter_config.json``) and a pointer
    to its base location (``hemblip_base.json``), plus processor/tokenizer files if given.

    ``base``: the base model location as :func:`hemblip.model.load_model` accepts it, a local
    path relative to the current directory; stored as :func:`base_pointers` says (absolute, or
    relative to ``out_dir`` when inside it), so the adapter loads from any directory.
    Returns the adapter weights path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model = getattr(peft_model, "module", peft_model)
    pointer, peft_base = base_pointers(base, out)
    # save_embedding_layers=False: embeddings are saved through modules_to_save when trained
    # (paper mode) and are not trained otherwise; peft's "auto" would look the base up on the
    # hub to compare vocabulary sizes.
    peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    config_path = out / "adapter_config.json"
    config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = peft_base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "hemblip_base.json").write_text(json.dumps({"base": pointer}) + "\n")
    if image_processor is not None:
        image_processor.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out / "adapter_model.safetensors"


def merge_adapter(peft_model):
    """Fold the adapters into the base weights; returns the plain ``BlipForConditionalGeneration``."""
    return peft_model.merge_and_unload()


def load_adapter(
    base_model, adapter_dir: str | os.PathLike, *, merge: bool = True, trainable: bool = False
):
    """Attach a saved adapter to ``base_model``; merged into a plain model when ``merge``."""
    from peft import PeftModel

    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise CheckpointError(f"{d}: not an adapter directory; missing adapter_config.json")
    peft_model = PeftModel.from_pretrained(base_model, str(d), is_trainable=trainable)
    _tie_trained_copies(peft_model)
    return merge_adapter(peft_model) if merge else peft_model
