"""The Ray Data plan: slide references -> per-slide CPU tasks -> caption actors -> write actors.

The write stage (:mod:`pipeline.job.stage_write`) writes each batch's cells as staged Parquet
files under the output, so the rows that reach the driver are per-file and per-slide metadata.

Streaming: slides are staged and detected by CPU tasks while earlier slides' crops are being
captioned; Ray Data's backpressure bounds how many crops wait in the object store. Each slide is
its own input block so that slides spread over CPU tasks instead of running one after another
inside one task. A zoned slide whose plan has several region tasks (a gigapixel smear) is split
further: its detect task submits them as Ray tasks of their own (``--region-tasks-in-flight`` at a
time, ``--detect-cpus`` each; they inherit the plan's ``runtime_env``) and lends its CPU while it
waits, then emits the slide's rows as one slide (:mod:`pipeline.job.stage_detect`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.job.listing import SlideRef
from pipeline.job.stage_caption import CaptionStage
from pipeline.job.stage_detect import DetectSettings, detect_batch, ref_to_json
from pipeline.job.stage_write import WriteStage
from pipeline.job.storage import S3Settings

__all__ = ["CaptionSettings", "WriteSettings", "build_plan", "resolve_gpus"]


@dataclass(frozen=True)
class WriteSettings:
    """The write stage: where staged files go and the run-wide cell columns (``base``: run_id,
    model_id, model_version, pipeline_version, schema_version). ``batch_rows``: rows per write
    batch (a staged file holds at most that many cells of one slide). ``cpus_per_actor`` is 0 by
    default: the writer reserves no CPU, so it can always be placed. With any reservation, a node
    that must host the whole stream alone (the others lost) can have its CPUs taken by detect
    tasks and the caption actor, the writer never starts, and the run hangs without a message
    (seen with 1 CPU left: detect 0.75 + caption 0.25 + writer 0.25)."""

    output: str
    s3: S3Settings
    run_id: str
    base: tuple[tuple[str, str], ...]
    batch_rows: int = 1024
    max_actors: int = 1
    cpus_per_actor: float = 0.0


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


def build_plan(
    refs: Sequence[SlideRef],
    detect: DetectSettings,
    caption: CaptionSettings,
    detect_cpus: float = 1.0,
    env: Mapping[str, str] | None = None,
    ledger=None,
    max_task_retries: int | None = None,
    write: WriteSettings | None = None,
    caption_stage: type | None = None,
):
    """A lazy :class:`ray.data.Dataset`: with ``write``, rows of per-file and per-slide metadata
    (keys: ``stage_write.OUTPUT_KEYS``); without, the captioned rows (the caption stage's keys).

    ``caption_stage``: the caption class (default :class:`CaptionStage`; tests and benchmarks
    pass a stand-in taking the same constructor arguments).

    ``ledger``: an :class:`~pipeline.job.stage_detect.AttemptLedger` actor handle the detect
    tasks report each attempt to. ``max_task_retries``: Ray's retries of a detect task whose
    worker died; Ray Data's default is unbounded, so a slide that kills every worker would keep
    the run going for ever. With a ledger it must exceed ``detect.max_slide_attempts`` (the
    attempt after the last allowed one records the slide failed); None keeps Ray Data's default.
    """
    import ray

    if not refs:
        raise ValueError("build_plan needs at least one slide")
    if (
        ledger is not None
        and max_task_retries is not None
        and max_task_retries < detect.max_slide_attempts
    ):
        raise ValueError(
            f"max_task_retries ({max_task_retries}) must be at least max_slide_attempts "
            f"({detect.max_slide_attempts})"
        )
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
        caption_stage or CaptionStage,
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
        compute=ray.data.ActorPoolStrategy(
            min_size=caption.min_actors, max_size=caption.max_actors
        ),
        num_cpus=caption.cpus_per_actor,
        num_gpus=caption.gpus_per_actor,
        **remote_args,
    )
    if write is not None:
        ds = ds.map_batches(
            WriteStage,
            batch_size=write.batch_rows,
            batch_format="numpy",
            fn_constructor_kwargs={
                "output": write.output,
                "s3": write.s3,
                "run_id": write.run_id,
                "base": dict(write.base),
            },
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=write.max_actors),
            num_cpus=write.cpus_per_actor,
            **remote_args,
        )
    return ds
