"""Batch captioning of white-cell crops: the :class:`Captioner` the pipeline's GPU actors run.

Crops are preprocessed as one batch on the model's device (``preprocess="device"``, the default:
the checkpoint's BLIP image processor reproduced with torch, see ``hemblip.preprocess``; the
processor itself is used when one of its settings cannot be reproduced, or with
``preprocess="processor"``), then one batched ``generate`` per ``batch_size`` crops (bf16
autocast on CUDA). Each caption is parsed into cell type, case and
every ontology attribute (:func:`hemblip.captions.parse_caption`) and scored by its mean token
log-probability (from ``generate``'s scores: a confidence signal, higher is more confident).

The cell type also gets a calibrated probability (``cell_type_confidence``; see
:mod:`hemblip.calibration`): the image features computed once for ``generate`` are reused by one
batched teacher-forced decoder pass that scores every ontology cell type's caption opening
(``"This is a neutrophil"``, ``"Neutrophil"``), giving ``p(type | image)`` at the checkpoint's
fitted temperature (``calibration.json``; without one, T = 1 and ``calibration.calibrated`` is
False).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hemblip.calibration import UNCALIBRATED, Calibration, load_calibration, type_probabilities
from hemblip.errors import DatasetError, HemblipConfigError
from hemblip.ontology import CELL_TYPES
from hemblip.preprocess import plan_for

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
# Bytes of decoder activations (repeated image features + logits) one type-scoring chunk may use.
_SCORE_CHUNK_BYTES = 256 * 2**20


@dataclass
class CaptionResult:
    """One crop's caption and what it says (``attributes``: every ontology name, None = unsaid).

    ``cell_type_confidence``: probability (0-1) of ``cell_type`` under the calibrated
    distribution over cell types; None when the caption names no type or scoring is off.
    ``top_cell_type`` / ``top_cell_type_probability``: that distribution's most likely type and
    its probability (may differ from the caption's type: greedy decoding commits word by word).
    """

    caption: str
    cell_type: str | None
    case: str | None
    attributes: dict[str, str | None]
    mean_logprob: float
    cell_type_confidence: float | None = None
    top_cell_type: str | None = None
    top_cell_type_probability: float | None = None


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
    ``type_confidence``: score every cell type for a calibrated ``cell_type_confidence`` (one
    extra teacher-forced decoder pass per batch); False skips it (the fields are None).
    ``self.calibration``: the :class:`~hemblip.calibration.Calibration` in use (read from the
    checkpoint's ``calibration.json``; ``calibrated`` False means T = 1).
    ``self.preprocess`` is the path in use: "device" falls back to "processor" (with a
    warning; the reason is in ``self.preprocess_fallback``) when the processor has a setting
    the device path does not reproduce.
    """

    def __init__(
        self,
        model=None,
        device: str | None = None,
        batch_size: int = 64,
        num_beams: int = 1,
        max_new_tokens: int | None = None,
        dtype: str = "auto",
        decoding: str = "greedy",
        min_new_tokens: int | None = None,
        allow_pickle: bool = False,
        preprocess: str = "device",
        base: str | None = None,
        type_confidence: bool = True,
        storage_options: Mapping[str, Any] | None = None,
    ):
        """``storage_options``: how an ``s3://`` model (and base) is reached (``endpoint_url``,
        ``region_name``, ``max_attempts``; see :func:`hemblip.model.load_model`); None: the
        environment's ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``."""
        import torch

        from hemblip.model import LoadedModel, load_model

        if batch_size < 1:
            raise HemblipConfigError(f"--batch-size must be >= 1, got {batch_size}")
        if num_beams < 1:
            raise HemblipConfigError(f"--num-beams must be >= 1, got {num_beams}")
        if decoding not in DECODING:
            raise HemblipConfigError(
                f"--decoding must be one of {', '.join(DECODING)}, got {decoding!r}"
            )
        if dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise HemblipConfigError(
                f"--dtype must be auto|bfloat16|float16|float32, got {dtype!r}"
            )
        if preprocess not in ("device", "processor"):
            raise HemblipConfigError(f"--preprocess must be device|processor, got {preprocess!r}")
        if base is not None and (model is None or isinstance(model, LoadedModel)):
            raise HemblipConfigError(
                "--base names the base of a LoRA adapter given with --model "
                + (
                    "(an already loaded model takes no --base)"
                    if model is not None
                    else "(the bundled demo checkpoint has none)"
                )
            )
        if isinstance(model, LoadedModel):
            loaded = model
            self.model_id = loaded.location
        elif model is None:
            loaded = load_model(DEMO_CHECKPOINT)
            self.model_id = "hemblip-demo"
        else:
            loaded = load_model(
                os.fspath(model) if isinstance(model, Path) else model,
                allow_pickle=allow_pickle,
                base=base,
                storage_options=storage_options,
            )
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
                _log.warning(
                    "%s: preprocessing with the image processor on the CPU: %s",
                    self.model_id,
                    self.preprocess_fallback,
                )
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
        self.type_confidence = bool(type_confidence)
        self.calibration: Calibration = (
            load_calibration(_checkpoint_dir(loaded), self.model_version)
            if self.type_confidence
            else UNCALIBRATED
        )
        self._type_prefixes = None  # _TypeOpenings, built on first use (False: none)
        self._tree_checked, self._tree_ok = False, False

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check_crops(crops) -> np.ndarray | list[np.ndarray]:
        if isinstance(crops, np.ndarray):
            if crops.ndim != 4:
                raise DatasetError(
                    f"crops: expected an (N, H, W, 3) uint8 array, got shape {crops.shape}"
                )
            if crops.shape[3] == 3 and crops.dtype == np.uint8 and min(crops.shape[1:3]) >= 1:
                return crops  # one array: batches are slices, no per-crop copies
            crops = list(crops)
        out = []
        for i, c in enumerate(crops):
            c = np.asarray(c)
            if c.ndim != 3 or c.shape[2] != 3 or c.dtype != np.uint8 or min(c.shape[:2]) < 1:
                raise DatasetError(
                    f"crop {i}: expected an (H, W, 3) uint8 image, got shape {c.shape} dtype {c.dtype}"
                )
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

    def _autocast(self):
        import torch

        return torch.autocast(
            self.device.type,
            dtype=self._amp_dtype or torch.float32,
            enabled=self._amp_dtype is not None,
        )

    def image_features(self, pixel_values):
        """The vision encoder's output (N, S, H) for a batch: what the decoder cross-attends to."""
        import torch

        with torch.inference_mode(), self._autocast():
            return self.model.vision_model(pixel_values=pixel_values)[0]

    def generate(self, pixel_values=None, *, image_embeds=None):
        """Token ids (N, L) incl. the leading [DEC] and mean token log-probs (N,) for a batch.

        Give ``pixel_values`` or the batch's :meth:`image_features` (``image_embeds``, reused by
        :meth:`cell_type_scores` so the vision encoder runs once). Decoding is
        ``BlipForConditionalGeneration.generate``'s: a ``[DEC]`` prompt, stop at ``[SEP]``.
        """
        import torch

        if image_embeds is None:
            image_embeds = self.image_features(pixel_values)
        cfg = self.model.config.text_config
        n = image_embeds.shape[0]
        with torch.inference_mode(), self._autocast():
            prompt = torch.full(
                (n, 1), cfg.bos_token_id, dtype=torch.long, device=image_embeds.device
            )
            out = self.model.text_decoder.generate(
                input_ids=prompt,
                eos_token_id=cfg.sep_token_id,
                pad_token_id=cfg.pad_token_id,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=torch.ones(
                    image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device
                ),
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                **self.generate_kwargs,
            )
            scores = self.model.text_decoder.compute_transition_scores(
                out.sequences, out.scores, getattr(out, "beam_indices", None), normalize_logits=True
            ).float()
        seq = out.sequences
        gen = seq[:, seq.shape[1] - scores.shape[1] :]
        # Count tokens up to and including the first [SEP]; later positions are padding.
        is_end = gen == cfg.sep_token_id
        after_end = (is_end.cumsum(dim=1) - is_end.long()) > 0
        valid = ~after_end & torch.isfinite(scores)
        n = valid.sum(dim=1).clamp(min=1)
        mean_lp = scores.masked_fill(~valid, 0.0).sum(dim=1) / n
        return seq.cpu(), mean_lp.cpu()

    def _prefixes(self) -> _TypeOpenings | None:
        """The token sequences ``[DEC] opening-of-type`` of every cell type, as a prefix tree.

        Two caption styles (:func:`hemblip.captions.render_caption`): the healthy sentence
        (``"This is a neutrophil from ..."``) and the leukemic one (``"Neutrophil observed in
        ..."``). A type the tokenizer cannot spell (``[UNK]``) has no opening: the model cannot
        name it, so its probability is 0. None when no type can be spelled.
        """
        if self._type_prefixes is None:
            from hemblip._phrases import article

            bos = self.model.config.text_config.bos_token_id
            unk = getattr(self.tokenizer, "unk_token_id", None)
            rows, owner = [], []
            for k, ct in enumerate(CELL_TYPES):
                for text in (f"this is {article(ct)} {ct}", ct):
                    ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                    if ids and (unk is None or unk not in ids):
                        rows.append((bos, *ids))
                        owner.append(k)
            self._type_prefixes = _TypeOpenings.build(rows, owner, self.device) if rows else False
        return self._type_prefixes or None

    def cell_type_scores(self, image_embeds) -> np.ndarray:
        """Log-probability (nats) that the caption opens by naming each cell type: (N, K) float64
        numpy, K = ``len(CELL_TYPES)`` in that order, summed over the caption styles; ``-inf``
        for a type the tokenizer cannot spell.

        ``image_embeds``: :meth:`image_features` of the batch. One teacher-forced decoder pass
        per image over the prefix tree of all openings (each shared word once, tree attention),
        so the image's cross-attention keys are computed once per image, not once per type.
        Uncalibrated: divide by ``self.calibration.temperature`` and softmax for
        ``p(type | image)`` (:func:`hemblip.calibration.type_probabilities`).
        """
        tree = self._prefixes()
        if tree is None:
            return np.full((image_embeds.shape[0], len(CELL_TYPES)), -np.inf)
        if not self._tree_checked:
            self._tree_checked = True
            self._check_tree(tree, image_embeds[:1])
        if self._tree_ok:
            row_lp = self._score_tree(tree, image_embeds)
        else:
            row_lp = self._score_rows(tree, image_embeds)
        return tree.per_type(row_lp, len(CELL_TYPES))

    def _chunk(self, tokens: int) -> int:
        """Images per decoder call so that logits stay within ``_SCORE_CHUNK_BYTES``."""
        vocab = self.model.config.text_config.vocab_size
        return max(1, _SCORE_CHUNK_BYTES // (4 * tokens * vocab))

    def _score_tree(self, tree: _TypeOpenings, image_embeds):
        """Log p of every opening row (N, P) via the prefix tree (one sequence per image)."""
        import torch

        n, seq_len = image_embeds.shape[:2]
        t = tree.node_ids.shape[1]
        step = self._chunk(t)
        parts = []
        with torch.inference_mode(), self._autocast():
            for a in range(0, n, step):
                emb = image_embeds[a : a + step]
                m = emb.shape[0]
                logits = self.model.text_decoder(
                    input_ids=tree.node_ids.expand(m, t),
                    position_ids=tree.node_pos.expand(m, t),
                    attention_mask=tree.tree_mask.expand(m, 1, t, t),
                    encoder_hidden_states=emb,
                    encoder_attention_mask=torch.ones(
                        (m, seq_len), dtype=torch.long, device=emb.device
                    ),
                    use_cache=False,
                    return_dict=True,
                ).logits
                lp = torch.log_softmax(logits.float(), dim=-1)  # (m, T, V)
                picked = lp[:, tree.ctx, tree.tgt]  # (m, P, L-1)
                parts.append((picked * tree.valid).sum(dim=2))
        return torch.cat(parts).double()

    def _score_rows(self, tree: _TypeOpenings, image_embeds):
        """Log p of every opening row (N, P), one plain causal sequence per opening and image:
        the reference the tree pass is checked against, and its fallback."""
        import torch

        n, seq_len = image_embeds.shape[:2]
        ids, mask = tree.row_ids, tree.row_mask
        p, length = ids.shape
        step = self._chunk(p * length)
        targets, keep = ids[:, 1:], mask[:, 1:].float()
        parts = []
        with torch.inference_mode(), self._autocast():
            for a in range(0, n, step):
                emb = image_embeds[a : a + step]
                m = emb.shape[0]
                logits = self.model.text_decoder(
                    input_ids=ids.repeat(m, 1),
                    attention_mask=mask.repeat(m, 1),
                    encoder_hidden_states=emb.repeat_interleave(p, dim=0),
                    encoder_attention_mask=torch.ones(
                        (m * p, seq_len), dtype=torch.long, device=emb.device
                    ),
                    use_cache=False,
                    return_logits=True,
                )
                lp = (
                    torch.log_softmax(logits.float(), dim=-1)
                    .gather(-1, targets.repeat(m, 1).unsqueeze(-1))
                    .squeeze(-1)
                )
                parts.append((lp * keep.repeat(m, 1)).sum(dim=1).view(m, p))
        return torch.cat(parts).double()

    def _check_tree(self, tree: _TypeOpenings, image_embeds) -> None:
        """Once per captioner: the tree pass must equal plain teacher forcing on one image (it
        relies on the decoder taking a 4-D additive mask and explicit positions); else the plain
        pass is used from then on, with a warning."""
        import torch

        tol = 1e-3 if self._amp_dtype is None else 0.1
        try:
            got = self._score_tree(tree, image_embeds)
            problem = None
        except Exception as exc:  # noqa: BLE001 - any failure means: use the plain pass
            got, problem = (
                None,
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            )
        want = self._score_rows(tree, image_embeds)
        if got is not None and not torch.allclose(got, want, atol=tol, rtol=0):
            problem = (
                f"differs from plain teacher forcing by {float((got - want).abs().max()):.3g} nats"
            )
        self._tree_ok = problem is None
        if problem:
            _log.warning(
                "%s: cell-type scoring falls back to one decoder row per type opening "
                "(slower): the prefix-tree pass %s",
                self.model_id,
                problem,
            )

    # ------------------------------------------------------------------ public
    def caption(self, crops) -> list[CaptionResult]:
        """Caption crops: (N, H, W, 3) uint8 array or list of (H, W, 3) uint8 arrays.

        Returns one :class:`CaptionResult` per crop, in order. Crops of any size are resized to
        the checkpoint's image size (see :meth:`pixel_values`).
        """
        return self.caption_and_score(crops)[0]

    def caption_and_score(self, crops) -> tuple[list[CaptionResult], np.ndarray | None]:
        """:meth:`caption` plus the raw cell-type scores: (N, K) float64 log-probabilities
        (:meth:`cell_type_scores`, before the temperature), or None with ``type_confidence``
        off. What ``python -m hemblip calibrate`` fits the temperature on."""
        from hemblip.captions import parse_caption
        from hemblip.tokenizer import detokenize

        items = self._check_crops(crops)
        results: list[CaptionResult] = []
        all_scores: list[np.ndarray] = []
        index = {ct: k for k, ct in enumerate(CELL_TYPES)}
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            embeds = self.image_features(self.pixel_values(batch))
            seq, mean_lp = self.generate(image_embeds=embeds)
            probs = None
            if self.type_confidence:
                scores = self.cell_type_scores(embeds)
                all_scores.append(scores)
                probs = type_probabilities(scores, self.calibration.temperature)
            for j, (ids, lp) in enumerate(zip(seq.tolist(), mean_lp.tolist())):
                text = detokenize(self.tokenizer, ids)
                parsed = parse_caption(text)
                conf = top = top_p = None
                if probs is not None and np.all(np.isfinite(probs[j])):
                    best = int(np.argmax(probs[j]))
                    top, top_p = CELL_TYPES[best], float(probs[j, best])
                    if parsed.cell_type in index:
                        conf = float(probs[j, index[parsed.cell_type]])
                results.append(
                    CaptionResult(
                        text,
                        parsed.cell_type,
                        parsed.case,
                        dict(parsed.attributes),
                        float(lp),
                        conf,
                        top,
                        top_p,
                    )
                )
        if not self.type_confidence:
            return results, None
        return results, (
            np.concatenate(all_scores) if all_scores else np.zeros((0, len(CELL_TYPES)))
        )


@dataclass
class _TypeOpenings:
    """Every cell type's caption openings as token rows and as one prefix tree.

    Rows: ``row_ids``/``row_mask`` (P, L) right-padded, ``owner`` (P,) cell-type index. Tree:
    the distinct proper prefixes of the rows ("contexts": each needs its next-token
    distribution), one node each, ``node_ids``/``node_pos`` (1, T) token and depth,
    ``tree_mask`` (1, 1, T, T) additive: a node attends to itself and its ancestors only, so
    the logits at node j are exactly those after the plain sequence that node j ends.
    Row p's log-probability is the sum over i of ``logp[ctx[p, i], tgt[p, i]]`` where
    ``valid[p, i]``.
    """

    row_ids: Any
    row_mask: Any
    owner: Any
    node_ids: Any
    node_pos: Any
    tree_mask: Any
    ctx: Any
    tgt: Any
    valid: Any

    @classmethod
    def build(cls, rows: list[tuple[int, ...]], owner: list[int], device) -> _TypeOpenings:
        import torch

        contexts: dict[tuple[int, ...], int] = {}
        for r in sorted(rows, key=len):
            for i in range(1, len(r)):
                contexts.setdefault(r[:i], len(contexts))
        nodes = sorted(contexts, key=lambda c: (len(c), c))  # parents before children
        index = {c: j for j, c in enumerate(nodes)}
        t = len(nodes)
        allowed = torch.zeros((t, t), dtype=torch.bool)
        for j, c in enumerate(nodes):
            for i in range(1, len(c) + 1):
                allowed[j, index[c[:i]]] = True
        mask = torch.zeros((t, t), dtype=torch.float32).masked_fill(
            ~allowed, torch.finfo(torch.float32).min
        )
        length = max(len(r) for r in rows)
        row_ids = torch.zeros((len(rows), length), dtype=torch.long)
        row_mask = torch.zeros((len(rows), length), dtype=torch.long)
        ctx = torch.zeros((len(rows), length - 1), dtype=torch.long)
        tgt = torch.zeros((len(rows), length - 1), dtype=torch.long)
        valid = torch.zeros((len(rows), length - 1), dtype=torch.float32)
        for p, r in enumerate(rows):
            row_ids[p, : len(r)] = torch.tensor(r)
            row_mask[p, : len(r)] = 1
            for i in range(1, len(r)):
                ctx[p, i - 1], tgt[p, i - 1], valid[p, i - 1] = index[r[:i]], r[i], 1.0
        to = lambda x: x.to(device)  # noqa: E731
        return cls(
            to(row_ids),
            to(row_mask),
            torch.tensor(owner, device=device),
            to(torch.tensor([[c[-1] for c in nodes]])),
            to(torch.tensor([[len(c) - 1 for c in nodes]])),
            to(mask[None, None]),
            to(ctx),
            to(tgt),
            to(valid),
        )

    def per_type(self, row_lp, n_types: int) -> np.ndarray:
        """(N, K) float64 numpy: log of the summed probability of each type's rows."""
        import torch

        out = torch.full(
            (row_lp.shape[0], n_types), -torch.inf, dtype=torch.float64, device=row_lp.device
        )
        for k in range(n_types):
            sel = self.owner == k
            if bool(sel.any()):
                out[:, k] = torch.logsumexp(row_lp[:, sel], dim=1)
        return out.cpu().numpy()


def _checkpoint_dir(loaded) -> Path | None:
    """The folder whose ``calibration.json`` belongs to ``loaded``: the location itself when it
    is a local folder (for an adapter: the adapter's), else the folder of the last weights file
    read (the local mirror of an ``s3://``/hub checkpoint); None for a freshly built model."""
    loc = Path(str(loaded.location))
    if not str(loaded.location).startswith(("s3://", "config:")) and loc.is_dir():
        return loc
    files = list(getattr(loaded, "weights_files", None) or [])
    return files[-1].parent if files else None
