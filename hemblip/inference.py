"""Batch captioning of white-cell crops: the :class:`Captioner` the pipeline's GPU actors run.

Crops are preprocessed as one batch on the model's device (``preprocess="device"``, the default:
the checkpoint's BLIP image processor reproduced with torch, see ``hemblip._preprocess``; the
processor itself is used when one of its settings cannot be reproduced, or with
``preprocess="processor"``), then one batched ``generate`` per ``batch_size`` crops (bf16
autocast on CUDA). Each caption is parsed into cell type, case and
every ontology attribute (:func:`hemblip.captions.parse_caption`) and scored by its mean token
log-probability (from ``generate``'s scores: a confidence signal, higher is more confident).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hemblip._preprocess import plan_for
from hemblip.errors import DatasetError, HemblipConfigError

__all__ = ["Captioner", "CaptionResult", "DEMO_CHECKPOINT", "DECODING"]

_log = logging.getLogger(__name__)

DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo_checkpoint"

#: Decoding presets. "beam" is the HemBLIP paper's: 4 beams, repetition penalty 1.15,
#: no repeated 3-grams.
DECODING: dict[str, dict[str, Any]] = {
    "greedy": {"num_beams": 1},
    "beam": {"num_beams": 4, "repetition_penalty": 1.15, "no_repeat_ngram_size": 3},
}
_MAX_NEW_TOKENS_CAP = 96  # longest rendered caption is ~70 tokens


@dataclass
class CaptionResult:
    """One crop's caption and what it says (``attributes``: every ontology name, None = unsaid)."""

    caption: str
    cell_type: str | None
    case: str | None
    attributes: dict[str, str | None]
    mean_logprob: float


class Captioner:
    """Caption batches of crops with a HemBLIP checkpoint.

    ``model``: None (the committed demo checkpoint), a checkpoint/adapter directory, an
    ``s3://`` URI, a hub id, or an already loaded :class:`hemblip.model.LoadedModel`.
    ``device``: None picks CUDA when available. ``dtype``: "auto" (bf16 autocast on CUDA,
    float32 on CPU), "bfloat16", "float16" or "float32". ``decoding``: "greedy" (default) or
    "beam" (the paper's settings); ``num_beams`` > 1 with greedy means plain beam search.
    ``min_new_tokens``: force at least this many tokens (benchmarks use min = max).
    ``preprocess``: "device" (default: resize/rescale/normalise batched on ``device``) or
    "processor" (the checkpoint's PIL image processor, one crop at a time on the CPU).
    ``base``: for a LoRA adapter ``model``, the base model to use instead of the one the
    adapter names (``--base``; see :func:`hemblip.model.load_model`).
    ``self.preprocess`` is the path in use: "device" falls back to "processor" (with a
    warning; the reason is in ``self.preprocess_fallback``) when the processor has a setting
    the device path does not reproduce.
    """

    def __init__(self, model=None, device: str | None = None, batch_size: int = 64,
                 num_beams: int = 1, max_new_tokens: int | None = None, dtype: str = "auto",
                 decoding: str = "greedy", min_new_tokens: int | None = None,
                 allow_pickle: bool = False, preprocess: str = "device", base: str | None = None):
        import torch

        from hemblip.model import LoadedModel, load_model

        if batch_size < 1:
            raise HemblipConfigError(f"--batch-size must be >= 1, got {batch_size}")
        if num_beams < 1:
            raise HemblipConfigError(f"--num-beams must be >= 1, got {num_beams}")
        if decoding not in DECODING:
            raise HemblipConfigError(f"--decoding must be one of {', '.join(DECODING)}, got {decoding!r}")
        if dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise HemblipConfigError(f"--dtype must be auto|bfloat16|float16|float32, got {dtype!r}")
        if preprocess not in ("device", "processor"):
            raise HemblipConfigError(f"--preprocess must be device|processor, got {preprocess!r}")
        if base is not None and (model is None or isinstance(model, LoadedModel)):
            raise HemblipConfigError(
                "--base names the base of a LoRA adapter given with --model "
                + ("(an already loaded model takes no --base)" if model is not None
                   else "(the bundled demo checkpoint has none)"))
        if isinstance(model, LoadedModel):
            loaded = model
            self.model_id = loaded.location
        elif model is None:
            loaded = load_model(DEMO_CHECKPOINT)
            self.model_id = "hemblip-demo"
        else:
            loaded = load_model(os.fspath(model) if isinstance(model, Path) else model,
                                allow_pickle=allow_pickle, base=base)
            self.model_id = str(model) if base is None else f"{model} (base {base})"
        self._loaded = loaded
        self.model_version = loaded.version
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self._amp_dtype = None if dtype == "float32" else getattr(torch, dtype)
        self.model = loaded.model.to(self.device).eval()
        self.image_processor = loaded.image_processor
        self._device_prep, self.preprocess_fallback = None, None
        if preprocess == "device":
            self._device_prep, self.preprocess_fallback = plan_for(self.image_processor)
            if self._device_prep is None:
                _log.warning("%s: preprocessing with the image processor on the CPU: %s",
                             self.model_id, self.preprocess_fallback)
        self.preprocess = "device" if self._device_prep is not None else "processor"
        self.tokenizer = loaded.tokenizer
        self.batch_size = batch_size
        gen = dict(DECODING[decoding])
        if num_beams > 1 and decoding == "greedy":
            gen["num_beams"] = num_beams
        text_cfg = self.model.config.text_config
        limit = min(text_cfg.max_position_embeddings - 2, _MAX_NEW_TOKENS_CAP)
        gen["max_new_tokens"] = int(max_new_tokens or limit)
        if gen["max_new_tokens"] < 1:
            raise HemblipConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if min_new_tokens is not None:
            gen["min_new_tokens"] = int(min_new_tokens)
        self.generate_kwargs = gen

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check_crops(crops) -> np.ndarray | list[np.ndarray]:
        if isinstance(crops, np.ndarray):
            if crops.ndim != 4:
                raise DatasetError(f"crops: expected an (N, H, W, 3) uint8 array, got shape {crops.shape}")
            if crops.shape[3] == 3 and crops.dtype == np.uint8 and min(crops.shape[1:3]) >= 1:
                return crops  # one array: batches are slices, no per-crop copies
            crops = list(crops)
        out = []
        for i, c in enumerate(crops):
            c = np.asarray(c)
            if c.ndim != 3 or c.shape[2] != 3 or c.dtype != np.uint8 or min(c.shape[:2]) < 1:
                raise DatasetError(
                    f"crop {i}: expected an (H, W, 3) uint8 image, got shape {c.shape} dtype {c.dtype}")
            out.append(c)
        return out

    def pixel_values(self, crops: np.ndarray | list[np.ndarray]):
        """Model input for crops: float32 tensor (N, 3, S, S) on the captioner's device.

        ``crops``: (N, H, W, 3) uint8 array or list of (H, W, 3) uint8 arrays, any size; S is
        the checkpoint's image size. Values in the processor's normalised units
        ((x / 255 - mean) / std per channel). On the device path they match the processor's
        but for rare values one or two uint8 steps of the resized image off (measured in
        ``docs/readme/hemblip-model.md``).
        """
        if self._device_prep is not None:
            return self._device_prep(crops, self.device)
        px = self.image_processor(images=list(crops), return_tensors="pt")["pixel_values"]
        return px.to(self.device)

    def generate(self, pixel_values):
        """Token ids (N, L) incl. the leading [DEC] and mean token log-probs (N,) for a batch."""
        import torch

        cfg = self.model.config.text_config
        with torch.inference_mode(), torch.autocast(
                self.device.type, dtype=self._amp_dtype or torch.float32,
                enabled=self._amp_dtype is not None):
            out = self.model.generate(pixel_values=pixel_values, do_sample=False,
                                      output_scores=True, return_dict_in_generate=True,
                                      **self.generate_kwargs)
            scores = self.model.text_decoder.compute_transition_scores(
                out.sequences, out.scores, getattr(out, "beam_indices", None),
                normalize_logits=True).float()
        seq = out.sequences
        gen = seq[:, seq.shape[1] - scores.shape[1]:]
        # Count tokens up to and including the first [SEP]; later positions are padding.
        is_end = gen == cfg.sep_token_id
        after_end = (is_end.cumsum(dim=1) - is_end.long()) > 0
        valid = ~after_end & torch.isfinite(scores)
        n = valid.sum(dim=1).clamp(min=1)
        mean_lp = (scores.masked_fill(~valid, 0.0).sum(dim=1) / n)
        return seq.cpu(), mean_lp.cpu()

    # ------------------------------------------------------------------ public
    def caption(self, crops) -> list[CaptionResult]:
        """Caption crops: (N, H, W, 3) uint8 array or list of (H, W, 3) uint8 arrays.

        Returns one :class:`CaptionResult` per crop, in order. Crops of any size are resized to
        the checkpoint's image size (see :meth:`pixel_values`).
        """
        from hemblip.captions import parse_caption
        from hemblip.tokenizer import detokenize

        items = self._check_crops(crops)
        results: list[CaptionResult] = []
        for start in range(0, len(items), self.batch_size):
            batch = items[start:start + self.batch_size]
            seq, mean_lp = self.generate(self.pixel_values(batch))
            for ids, lp in zip(seq.tolist(), mean_lp.tolist()):
                text = detokenize(self.tokenizer, ids)
                parsed = parse_caption(text)
                results.append(CaptionResult(text, parsed.cell_type, parsed.case,
                                             dict(parsed.attributes), float(lp)))
        return results
