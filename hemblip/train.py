"""Fine-tune (full or LoRA) a BLIP captioner on ``CaptionSample`` lists.

Captions are framed exactly as ``generate`` produces them (``[DEC] words... [SEP]``; labels are the
ids with padding set to -100). AdamW (weight decay 0.05), cosine schedule with 10 % linear warm-up,
gradient clipping at 1.0, validation loss after every epoch, early stopping (patience 2), and the
full training state (weights as safetensors, optimizer/scheduler state, epoch counters) written
after every epoch so ``resume=True`` continues where a run stopped.

Output directory layout::

    OUT/                  best model so far: a checkpoint (full) or an adapter (lora; its
                          hemblip_base.json names the base absolute, or "base" for OUT/base)
    OUT/base/             lora only, when the base was a config spec: the base weights
    OUT/_resume/          weights.safetensors, optimizer.pt, scheduler.pt, state.json
    OUT/train_log.jsonl   one line per epoch: train/val loss, lr, seconds

The loop runs in one process, or once per Ray Train worker (:mod:`hemblip.train_ray`) with
``torch.distributed`` initialised: samples are sharded by rank, validation losses all-reduced,
and only rank 0 writes files.

Augmentation (:mod:`hemblip.augment`: geometry, scale, stain, resolution, JPEG) applies to the
training split only; ``balance="class"`` draws each cell type equally often per epoch.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hemblip.errors import DatasetError, HemblipConfigError
from hemblip.lora import LoraSettings

__all__ = ["TrainConfig", "TrainResult", "load_splits", "train", "BALANCES"]

MODES = ("full", "lora")
#: ``--balance``: "none" = every (oversampled) training sample once per epoch; "class" = each
#: cell type the same number of draws per epoch (the epoch keeps its length: rarer types are
#: repeated, commoner ones subsampled afresh each epoch, so every sample is still seen).
BALANCES = ("none", "class")


@dataclass
class TrainConfig:
    """Settings of one training run; messages of invalid values name the CLI flag."""

    out: str
    base: str = "tiny"
    mode: str = "full"
    epochs: int = 10
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    patience: int = 2
    seed: int = 0
    resume: bool = False
    augment: bool | str | tuple = True  # kinds of hemblip.augment.KINDS; True = all, False = none
    aug_scale: float = 0.2  # ± field-of-view fraction
    aug_hue: float = 0.04  # ± fraction of the hue circle
    aug_saturation: tuple[float, float] = (0.8, 1.2)
    aug_resolution_mpp: tuple[float, float] = (0.22, 0.28)
    aug_jpeg: tuple[int, int] = (70, 95)
    # The training crops cover context x the job's field (cut wider by load_splits) so that
    # scale augmentation zooms out onto real smear; 1.0 = the job's crops as they are.
    context: float = 1.0
    balance: str = "none"
    max_length: int = 64
    max_steps: int | None = None  # stop after this many optimiser steps in total (smoke runs)
    workers: int = 0  # 0 = this process; N >= 1 = Ray Train data-parallel workers
    grad_clip: float = 1.0
    device: str | None = None  # None: cuda when available (Ray Train places its workers itself)
    log_every: int = 10
    oversample: dict[str, int] = field(default_factory=dict)  # source name -> repeat factor
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if not self.out:
            raise HemblipConfigError("--out is required")
        if self.mode not in MODES:
            raise HemblipConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for flag, value in (
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
            ("--max-length", self.max_length),
            ("--log-every", self.log_every),
        ):
            if value < 1:
                raise HemblipConfigError(f"{flag} must be >= 1, got {value}")
        if self.max_length < 4:
            raise HemblipConfigError(f"--max-length must be >= 4, got {self.max_length}")
        if not self.lr > 0:
            raise HemblipConfigError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise HemblipConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise HemblipConfigError(f"--warmup must be in [0, 1), got {self.warmup_fraction}")
        if self.patience < 1:
            raise HemblipConfigError(f"--patience must be >= 1, got {self.patience}")
        if self.max_steps is not None and self.max_steps < 1:
            raise HemblipConfigError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.workers < 0:
            raise HemblipConfigError(f"--workers must be >= 0, got {self.workers}")
        if self.grad_clip <= 0:
            raise HemblipConfigError(f"--grad-clip must be > 0, got {self.grad_clip}")
        from hemblip.augment import parse_kinds

        self.augment = ",".join(parse_kinds(self.augment))
        self.aug_saturation = tuple(self.aug_saturation)
        self.aug_resolution_mpp = tuple(self.aug_resolution_mpp)
        self.aug_jpeg = tuple(self.aug_jpeg)
        self.augment_settings()  # range checks, messages naming the --aug-* flag
        if not (
            isinstance(self.context, int | float)
            and math.isfinite(self.context)
            and 1.0 <= self.context <= 2.0
        ):
            raise HemblipConfigError(f"--context must be a number in [1, 2], got {self.context!r}")
        if self.balance not in BALANCES:
            raise HemblipConfigError(
                f"--balance must be one of {', '.join(BALANCES)}, got {self.balance!r}"
            )
        for source, k in self.oversample.items():
            if int(k) < 1:
                raise HemblipConfigError(f"--oversample {source}={k}: factor must be >= 1")
        from hemblip.model import check_spec

        check_spec(self.base)  # a bad or retired spec fails before the data is read

    def augment_settings(self):
        """The :class:`hemblip.augment.AugmentSettings` of this run (kinds and ranges)."""
        from hemblip.augment import AugmentSettings

        return AugmentSettings(
            kinds=self.augment or (),
            scale=self.aug_scale,
            hue=self.aug_hue,
            saturation=self.aug_saturation,
            resolution_mpp=self.aug_resolution_mpp,
            jpeg_quality=self.aug_jpeg,
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d["lora"] = asdict(self.lora)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["lora"] = LoraSettings(**d.get("lora", {}))
        return cls(**d)


@dataclass
class TrainResult:
    """What a run did: per-epoch history and where the best model is."""

    out: Path
    best_val_loss: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict]
    trainable_params: int
    total_params: int

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0


# ----------------------------------------------------------------------------- data


def load_splits(
    spec: str,
    val_spec: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    context: float = 1.0,
) -> dict[str, list]:
    """``{"train", "val", "test"}`` sample lists from a dataset spec (see ``hemblip.data``).

    Samples carrying a split keep it; the rest are split train/val by cell type. With
    ``val_spec`` every sample of ``spec`` trains and ``val_spec`` validates. Validation and test
    crops are the job's; with ``context`` > 1 the training crops are cut ``context`` times wider
    (same µm/px) for scale augmentation (:func:`_widen`).
    """
    from dataclasses import replace

    from hemblip.data import load_dataset, split_samples

    samples = load_dataset(spec)
    if val_spec is not None:
        splits = {
            "train": [replace(s, split="train") for s in samples if s.split != "test"],
            "val": list(load_dataset(val_spec)),
            "test": [s for s in samples if s.split == "test"],
        }
    else:
        splits = split_samples(samples, val_fraction=val_fraction, seed=seed)
    if context > 1.0:
        splits["train"] = _widen(spec, splits["train"], context)
    return splits


def _load_wide(spec: str, context: float) -> list:
    """The dataset of ``spec`` cut as :func:`hemblip.data.load_dataset` cuts it, but with a
    ``context`` times wider field (µm) at ``context`` times the px, i.e. the same µm/px."""
    from hemblip.crops import CROP_PX, CROP_UM
    from hemblip.datasets import load_dataset

    return load_dataset(spec, crop_px=int(round(CROP_PX * context)), crop_um=CROP_UM * context)


def _widen(spec: str, train_samples: Sequence, context: float) -> list:
    """``train_samples`` with images covering ``context`` x the job's field around the same
    centre: re-cut from the source image where the sample has a scale (``mpp``), else (an image
    taken as given, nothing around it; or a (source, sample_id) the dataset uses twice) the crop
    mirrored outwards, as a smear would continue."""
    from dataclasses import replace

    from hemblip.crops import CROP_UM, cell_crop

    wide: dict[tuple, object] = {}
    for w in _load_wide(spec, context):
        key = (w.source, w.sample_id)
        wide[key] = None if key in wide else w  # an id used twice cannot say which cell it is
    out = []
    for s in train_samples:
        w = wide.get((s.source, s.sample_id))
        if w is not None and w.mpp is not None and s.mpp is not None:
            out.append(replace(s, image=w.image))
            continue
        side = s.image.shape[0]
        h, wd = s.image.shape[:2]
        image = cell_crop(
            s.image,
            (wd / 2, h / 2),
            CROP_UM / side,
            crop_um=CROP_UM * context,
            crop_px=max(16, int(round(side * context))),
        )
        out.append(replace(s, image=image))
    return out


class _Batches:
    """Shuffled mini-batches of (pixel_values, input_ids, attention_mask, labels) tensors."""

    def __init__(
        self,
        samples: Sequence,
        loaded,
        config: TrainConfig,
        augment: bool,
        rank: int = 0,
        world: int = 1,
        context: float = 1.0,
        balance: str = "none",
    ):
        samples = list(samples)
        if world > 1:
            # Equal shard sizes: DDP hangs if one rank runs a batch the others do not.
            per = math.ceil(len(samples) / world)
            samples = (samples * 2)[: per * world] if len(samples) < per * world else samples
        self.samples = samples[rank::world]
        size = loaded.image_processor.size
        # Shrink once to a little above the model's input size: augmenting 224 px crops every
        # epoch would cost more than the model step itself on a CPU.
        self.prep_px = int(math.ceil(max(size["height"], size["width"]) * 1.15))
        self.context = float(context)
        self.images = [
            _shrink(s.image, int(math.ceil(self.prep_px * self.context))) for s in self.samples
        ]
        self.loaded = loaded
        self.config = config
        self.settings = config.augment_settings() if augment else None
        self.rank = rank
        self.balance = balance
        self.groups: list[np.ndarray] = []
        if balance == "class":
            by_type: dict[str, list[int]] = {}
            for i, s in enumerate(self.samples):
                by_type.setdefault(s.cell_type or "", []).append(i)
            self.groups = [np.asarray(by_type[k]) for k in sorted(by_type)]
            self.per_group = max(1, int(round(len(self.samples) / max(1, len(self.groups)))))
            self.n_per_epoch = self.per_group * len(self.groups)
        else:
            self.n_per_epoch = len(self.samples)

    def __len__(self) -> int:
        return math.ceil(self.n_per_epoch / self.config.batch_size)

    def epoch_indices(self, epoch: int, rng: np.random.Generator, shuffle: bool) -> np.ndarray:
        """Sample indices of epoch ``epoch`` (1-based). With balance "class" each cell type gets
        ``per_group`` draws per epoch, taken in turn from a stream of seeded permutations of its
        samples: a rare type is repeated, a common one is walked through over several epochs, and
        every sample is drawn equally often (to one) over the run."""
        if self.balance != "class":
            n = len(self.samples)
            return rng.permutation(n) if shuffle else np.arange(n)
        idx = []
        for g, members in enumerate(self.groups):
            n, start = len(members), (epoch - 1) * self.per_group
            for cycle in range(start // n, (start + self.per_group - 1) // n + 1):
                perm = members[
                    np.random.default_rng([self.config.seed, self.rank, g, cycle]).permutation(n)
                ]
                lo, hi = max(start - cycle * n, 0), min(start + self.per_group - cycle * n, n)
                idx.append(perm[lo:hi])
        order = np.concatenate(idx)
        return rng.permutation(order) if shuffle else order

    def _image(self, i: int, rng: np.random.Generator) -> np.ndarray:
        from hemblip.augment import augment_crop, centre_field

        img = self.images[i]
        if self.settings is not None:
            return augment_crop(img, rng, self.settings, context=self.context)[0]
        if self.context != 1.0:
            return centre_field(img, self.context, max(2, int(round(img.shape[0] / self.context))))
        return img

    def iterate(self, epoch: int, shuffle: bool):
        from hemblip.tokenizer import encode_captions

        rng = np.random.default_rng([self.config.seed, epoch, self.rank])
        order = self.epoch_indices(epoch, rng, shuffle)
        bs = self.config.batch_size
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            items = [self.samples[i] for i in idx]
            images = [self._image(i, rng) for i in idx]
            pixels = self.loaded.image_processor(images=images, return_tensors="pt")["pixel_values"]
            ids, mask, labels = encode_captions(
                self.loaded.tokenizer,
                [s.caption for s in items],
                self.config.max_length,
                open_ended=[_open_ended(s) for s in items],
            )
            yield pixels, ids, mask, labels


def _open_ended(sample) -> bool:
    """A caption that names the cell type only (no attribute, no case): partial supervision."""
    return sample.case is None and all(v is None for v in (sample.attributes or {}).values())


def _shrink(image: np.ndarray, px: int) -> np.ndarray:
    from PIL import Image

    if max(image.shape[:2]) <= px:
        return image
    return np.asarray(Image.fromarray(image).resize((px, px), Image.BICUBIC))


def _expand(samples: Sequence, oversample: dict[str, int]) -> list:
    out = []
    for s in samples:
        out.extend([s] * int(oversample.get(s.source, 1)))
    return out


# ----------------------------------------------------------------------------- the loop


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _prepare_model(config: TrainConfig, out: Path, rank: int):
    """Load/build the base and wrap it for the mode; returns (loaded, trainable module)."""
    from hemblip.lora import apply_lora
    from hemblip.model import is_config_spec, load_model, save_model

    loaded = load_model(config.base)
    model = loaded.model
    if config.mode == "lora":
        if is_config_spec(config.base) and rank == 0 and not config.resume:
            # A freshly built base exists nowhere else: keep its (frozen) weights for the adapter.
            save_model(model, loaded.image_processor, loaded.tokenizer, out / "base")
        model = apply_lora(model, config.lora)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return loaded, model


def _save_best(model, loaded, config: TrainConfig, out: Path) -> None:
    from hemblip.lora import save_adapter
    from hemblip.model import is_config_spec, save_model

    model = getattr(model, "module", model)
    if config.mode == "full":
        save_model(model, loaded.image_processor, loaded.tokenizer, out)
        return
    # A relative base path is the user's, relative to the current directory: save_adapter stores
    # it absolute (OUT/base relative to OUT), so the adapter loads from anywhere.
    base_ref = str(out / "base") if is_config_spec(config.base) else config.base
    save_adapter(model, out, base_ref, loaded.image_processor, loaded.tokenizer)


def _save_state(model, optimizer, scheduler, state: dict, out: Path) -> None:
    import safetensors.torch
    import torch

    d = out / "_resume"
    d.mkdir(parents=True, exist_ok=True)
    # save_model handles the tied LM-head/embedding tensors that save_file would refuse.
    safetensors.torch.save_model(getattr(model, "module", model), str(d / "weights.safetensors"))
    torch.save(optimizer.state_dict(), d / "optimizer.pt")
    torch.save(scheduler.state_dict(), d / "scheduler.pt")
    (d / "state.json").write_text(json.dumps(state, indent=1))


def _load_state(model, optimizer, scheduler, out: Path) -> dict:
    import safetensors.torch
    import torch

    d = out / "_resume"
    needed = ["state.json", "weights.safetensors", "optimizer.pt", "scheduler.pt"]
    missing = [n for n in needed if not (d / n).is_file()]
    if missing:
        raise HemblipConfigError(f"--resume: {d} lacks {', '.join(missing)}; nothing to resume")
    safetensors.torch.load_model(getattr(model, "module", model), str(d / "weights.safetensors"))
    # Optimizer/scheduler state is tensors and numbers only: the restricted unpickler suffices.
    optimizer.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(d / "scheduler.pt", weights_only=True))
    return json.loads((d / "state.json").read_text())


def train(
    config: TrainConfig,
    train_samples: Sequence,
    val_samples: Sequence,
    *,
    log: Callable[[str], None] = print,
    report: Callable[[dict], None] | None = None,
    wrap_model: Callable | None = None,
) -> TrainResult:
    """Train on ``train_samples``, validate on ``val_samples`` (``CaptionSample`` lists).

    ``wrap_model``: applied to the model before optimisation (Ray Train passes its DDP
    ``prepare_model``); ``report``: called with each epoch's metrics (Ray Train's ``report``).
    Writes the best model to ``config.out`` (rank 0 only) and returns a :class:`TrainResult`.
    """
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from hemblip.lora import trainable_share

    if not train_samples:
        raise DatasetError("no training samples")
    if not val_samples:
        raise DatasetError("no validation samples (early stopping needs a validation set)")
    rank, world = _dist()
    out = Path(config.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    loaded, model = _prepare_model(config, out, rank)
    n_train, n_total = trainable_share(model)[:2]
    if wrap_model is not None:
        model = wrap_model(model)
    else:
        model = model.to(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device = next(model.parameters()).device
    train_b = _Batches(
        _expand(train_samples, config.oversample),
        loaded,
        config,
        bool(config.augment),
        rank,
        world,
        context=config.context,
        balance=config.balance,
    )
    val_b = _Batches(val_samples, loaded, config, False, rank, world)
    steps_per_epoch = len(train_b)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(round(config.warmup_fraction * total_steps)), total_steps
    )

    state = {
        "epoch": 0,
        "step": 0,
        "best_val_loss": math.inf,
        "best_epoch": 0,
        "bad_epochs": 0,
        "history": [],
        "config": config.to_json(),
    }
    if config.resume:
        state = _load_state(model, optimizer, scheduler, out)
        log(f"resumed from {out / '_resume'} after epoch {state['epoch']} (step {state['step']})")
    share = n_train / n_total if n_total else 0.0
    if rank == 0:
        log(
            f"mode {config.mode}: {n_train:,} of {n_total:,} parameters trainable ({share:.2%}); "
            f"{len(train_samples)} train / {len(val_samples)} val samples, "
            f"augment {config.augment or 'none'}, balance {config.balance}, "
            f"{steps_per_epoch} steps per epoch, {world} worker(s)"
        )

    epoch = state["epoch"]
    while epoch < config.epochs:
        if config.max_steps is not None and state["step"] >= config.max_steps:
            break
        if state["bad_epochs"] >= config.patience:
            break
        epoch += 1
        t0 = time.time()
        model.train()
        loss_sum, n_batches = 0.0, 0
        for i, batch in enumerate(train_b.iterate(epoch, shuffle=True)):
            px, ids, mask, labels = (t.to(device) for t in batch)
            loss = model(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], config.grad_clip
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            loss_sum += float(loss.detach())
            n_batches += 1
            if rank == 0 and (i + 1) % config.log_every == 0:
                log(
                    f"epoch {epoch}/{config.epochs} step {i + 1}/{steps_per_epoch} "
                    f"loss {loss_sum / n_batches:.4f} lr {scheduler.get_last_lr()[0]:.2e}"
                )
            if config.max_steps is not None and state["step"] >= config.max_steps:
                break
        model.eval()
        v_sum, v_n = 0.0, 0
        plain = getattr(model, "module", model)  # no DDP collectives during validation
        with torch.no_grad():
            for batch in val_b.iterate(epoch, shuffle=False):
                px, ids, mask, labels = (t.to(device) for t in batch)
                loss = plain(
                    pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels
                ).loss
                v_sum += float(loss) * len(ids)
                v_n += len(ids)
        t_sum, t_n, v_sum, v_n = _all_reduce_sum([loss_sum, n_batches, v_sum, v_n])
        train_loss = t_sum / max(t_n, 1)
        val_loss = v_sum / max(v_n, 1)
        improved = val_loss < state["best_val_loss"]
        row = {
            "epoch": epoch,
            "step": state["step"],
            "train_loss": round(train_loss, 5),
            "val_loss": round(val_loss, 5),
            "lr": scheduler.get_last_lr()[0],
            "seconds": round(time.time() - t0, 1),
            "best": improved,
        }
        state["history"].append(row)
        if improved:
            state.update(best_val_loss=val_loss, best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        if rank == 0:
            log(
                f"epoch {epoch}/{config.epochs}: train loss {train_loss:.4f}  val loss "
                f"{val_loss:.4f}{'  (best, saved)' if improved else ''}  [{row['seconds']} s]"
            )
            if improved:
                _save_best(model, loaded, config, out)
            _save_state(model, optimizer, scheduler, state, out)
            with open(out / "train_log.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
        if report is not None:
            report(row)
    stopped_early = state["bad_epochs"] >= config.patience and epoch < config.epochs
    if rank == 0 and stopped_early:
        log(f"early stop: validation loss did not improve for {config.patience} epochs")
    return TrainResult(
        out,
        state["best_val_loss"],
        state["best_epoch"],
        state["epoch"],
        stopped_early,
        state["history"],
        n_train,
        n_total,
    )
