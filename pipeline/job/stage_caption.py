"""Caption stage: a Ray Data actor holding one HemBLIP :class:`~hemblip.Captioner`.

The model is loaded once per actor in ``__init__`` (on the actor's GPU when it was given one,
else on CPU). ``__call__`` captions the ``kind == "cell"`` rows of a batch and passes the slide
rows through untouched.

Batch in (from :mod:`pipeline.job.stage_detect`, see its ``BATCH_KEYS``): ``kind`` (N,) object,
``crop`` (N, P, P, 3) uint8, and typed per-cell and per-slide columns this stage does not read.

Batch out: every input column but ``crop``, passed through as is, plus
``caption`` (N,) object str (``""`` on slide rows), ``caption_logprob`` (N,) float64 nats/token
(NaN on slide rows), ``cell_type`` / ``case`` (N,) object str, ``""`` when none,
``cell_type_confidence`` (N,) float64 calibrated probability 0-1 of that cell type (NaN when the
caption names none, and on slide rows), one (N,) object column per ontology attribute
(:data:`hemblip.ontology.ATTRIBUTE_NAMES`: the parsed value, ``""`` when none). String columns
say "none" with ``""``, never ``None``: Ray Data types an all-``None`` column of a block as
float, which cannot be concatenated with another block's strings. ``caption_seconds``
(N,) float64 s (the batch's caption time shared equally among its cells), ``caption_started``
(N,) float64 (``time.time()`` when the batch started; used by the benchmark).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import numpy as np

from hemblip.ontology import ATTRIBUTE_NAMES

__all__ = ["CaptionStage", "OUTPUT_KEYS", "caption_columns"]

#: Columns this stage adds (the input's, but ``crop``, pass through).
OUTPUT_KEYS = (
    "caption",
    "caption_logprob",
    "cell_type",
    "cell_type_confidence",
    "case",
    *ATTRIBUTE_NAMES,
    "caption_seconds",
    "caption_started",
)


class CaptionStage:
    """Callable class for ``Dataset.map_batches(compute=ActorPoolStrategy(...))``.

    ``model``: checkpoint dir, ``s3://`` prefix, or ``None`` for the demo checkpoint.
    ``expected_version``: the model version the driver planned with; a different checkpoint
    (e.g. overwritten mid-run) fails the actor instead of silently mixing versions.
    ``env``: environment set in the actor before loading (S3 endpoint for an ``s3://`` model).
    ``cpu_threads``: torch threads when running on CPU; None keeps what Ray gives the actor
    (OMP_NUM_THREADS = its CPUs rounded, 1 for a fractional actor). More threads than reserved
    cores oversubscribe the node: on a shared 2-core machine 2 threads captioned ~17x slower
    than 1 (bench/bench_pipeline.py).
    ``base``: for a LoRA adapter ``model``, the base model to use instead of the one the adapter
    names (``--base``); the version then hashes that base + the adapter, as the driver's.
    """

    def __init__(
        self,
        model: str | None = None,
        batch_size: int = 32,
        device: str | None = None,
        expected_version: str | None = None,
        env: Mapping[str, str] | None = None,
        cpu_threads: int | None = None,
        base: str | None = None,
    ):
        # The run's settings win over whatever this worker process inherited.
        os.environ.update(env or {})
        import torch

        from hemblip import Captioner
        from hemblip.errors import CheckpointError

        if cpu_threads is not None and not torch.cuda.is_available():
            torch.set_num_threads(cpu_threads)
        if base is not None:
            from hemblip.inference import DEMO_CHECKPOINT
            from hemblip.model import load_model

            # Loaded here: the adapter's own base pointer is replaced before anything is read.
            model = load_model(DEMO_CHECKPOINT if model is None else model, base=base)
        self.captioner = Captioner(model, device=device, batch_size=batch_size)
        if expected_version is not None and self.captioner.model_version != expected_version:
            raise CheckpointError(
                f"{self.captioner.model_id}: model version {self.captioner.model_version} differs from "
                f"{expected_version} that the run was planned with (checkpoint changed during the run?)"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.time()
        kinds = batch["kind"]
        n = len(kinds)
        idx = [i for i in range(n) if kinds[i] == "cell"]
        if idx:
            t0 = time.perf_counter()
            results = self.captioner.caption(
                np.ascontiguousarray(batch["crop"][idx], dtype=np.uint8)
            )
            share = (time.perf_counter() - t0) / len(idx)
        else:
            results, share = [], 0.0
        return caption_columns(batch, idx, results, share, started)


def caption_columns(
    batch: dict[str, np.ndarray], idx: list[int], results, share: float, started: float
) -> dict[str, np.ndarray]:
    """The stage's output batch: ``batch`` minus ``crop``, plus the caption columns of the cell
    rows ``idx`` from ``results`` (:class:`hemblip.CaptionResult`-like objects, one per index);
    ``share``: caption seconds attributed to each cell. Shared with test and benchmark stand-ins."""
    n = len(batch["kind"])
    # "" says "none" in the string columns: Ray Data types an all-None column as float, and a
    # float block cannot be concatenated with a string block of the next stage's batch.
    caption = np.full(n, "", dtype=object)
    logprob = np.full(n, np.nan, dtype=np.float64)
    cell_type = np.full(n, "", dtype=object)
    type_conf = np.full(n, np.nan, dtype=np.float64)
    case = np.full(n, "", dtype=object)
    attributes = {name: np.full(n, "", dtype=object) for name in ATTRIBUTE_NAMES}
    seconds = np.zeros(n, dtype=np.float64)
    for i, r in zip(idx, results, strict=True):
        caption[i] = r.caption or ""
        logprob[i] = float(r.mean_logprob)
        cell_type[i] = r.cell_type or ""
        if r.cell_type_confidence is not None:
            type_conf[i] = float(r.cell_type_confidence)
        case[i] = r.case or ""
        for name, value in dict(r.attributes).items():
            if name in attributes:
                attributes[name][i] = value or ""
        seconds[i] = share
    out = {key: value for key, value in batch.items() if key != "crop"}
    out.update(
        caption=caption,
        caption_logprob=logprob,
        cell_type=cell_type,
        cell_type_confidence=type_conf,
        case=case,
        **attributes,
        caption_seconds=seconds,
        caption_started=np.full(n, started, dtype=np.float64),
    )
    return out
