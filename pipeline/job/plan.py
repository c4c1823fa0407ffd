"""The Ray Data plan: slide references -> per-slide CPU tasks -> caption actor pool -> rows.

Streaming: slides are staged and detected by CPU tasks while earlier slides' crops are being
captioned; Ray Data's backpressure bounds how many crops wait in the object store. Each slide is
its own input block so that slides spread over CPU tasks instead of running one after another
inside one task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.job.listing import SlideRef
from pipeline.job.stage_caption import CaptionStage
from pipeline.job.stage_detect import DetectSettings, detect_batch, ref_to_json

__all__ = ["CaptionSettings", "build_plan", "resolve_gpus"]


@dataclass(frozen=True)
class CaptionSettings:
    """Actor pool of the caption stage. ``gpus_per_actor`` may be fractional (actors share a GPU);
    0 runs on CPU. ``cpus_per_actor`` is fractional on purpose: an actor holding a whole CPU can
    starve the detect tasks on a small node and stall the stream."""

    model: str | None
    model_version: str | None
    batch_size: int = 32
    min_actors: int = 1
    max_actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 0.25
    cpu_threads: int | None = None
    #: for a LoRA adapter ``model``: the base model to use instead of the one it names (--base)
    base: str | None = None


def resolve_gpus(requested: float | None) -> float:
    """``None`` -> 1 GPU per actor when the cluster has GPUs, else 0 (CPU fallback)."""
    if requested is not None:
        return float(requested)
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_plan(refs: Sequence[SlideRef], detect: DetectSettings, caption: CaptionSettings,
               detect_cpus: float = 1.0, env: Mapping[str, str] | None = None, ledger=None,
               max_task_retries: int | None = None):
    """A lazy :class:`ray.data.Dataset` of captioned rows (keys: ``stage_caption.OUTPUT_KEYS``).

    ``ledger``: an :class:`~pipeline.job.stage_detect.AttemptLedger` actor handle the detect
    tasks report each attempt to. ``max_task_retries``: Ray's retries of a detect task whose
    worker died; Ray Data's default is unbounded, so a slide that kills every worker would keep
    the run going for ever. With a ledger it must exceed ``detect.max_slide_attempts`` (the
    attempt after the last allowed one records the slide failed); None keeps Ray Data's default.
    """
    import ray

    if not refs:
        raise ValueError("build_plan needs at least one slide")
    if ledger is not None and max_task_retries is not None and max_task_retries < detect.max_slide_attempts:
        raise ValueError(f"max_task_retries ({max_task_retries}) must be at least max_slide_attempts "
                         f"({detect.max_slide_attempts})")
    runtime_env = {"env_vars": dict(env)} if env else None
    remote_args = {"runtime_env": runtime_env} if runtime_env else {}
    detect_args = dict(remote_args)
    if max_task_retries is not None:
        detect_args["max_retries"] = int(max_task_retries)
    items = [{"slide_id": r.slide_id, "ref": ref_to_json(r)} for r in refs]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        detect_batch,
        batch_size=1,
        fn_kwargs={"settings": detect, "ledger": ledger},
        num_cpus=detect_cpus,
        **detect_args,
    )
    ds = ds.map_batches(
        CaptionStage,
        batch_size=caption.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "model": caption.model,
            "batch_size": caption.batch_size,
            "expected_version": caption.model_version,
            "env": dict(env or {}),
            "cpu_threads": caption.cpu_threads,
            "base": caption.base,
        },
        compute=ray.data.ActorPoolStrategy(min_size=caption.min_actors, max_size=caption.max_actors),
        num_cpus=caption.cpus_per_actor,
        num_gpus=caption.gpus_per_actor,
        **remote_args,
    )
    return ds
