"""Data-parallel training on Ray Train: the same loop as :func:`hemblip.train.train`, N workers.

The only ``hemblip`` module that imports Ray. Each worker runs :func:`hemblip.train.train` with
``torch.distributed`` initialised by ``TorchTrainer`` (gloo on CPU, NCCL on GPU), the model
wrapped in DistributedDataParallel by ``ray.train.torch.prepare_model``, its rank's shard of the
samples, and validation losses all-reduced so every worker takes the same early-stopping
decision. Rank 0 writes the checkpoint to ``config.out``, which must therefore be a path the
workers can write and the caller can read (a local path on one machine, a shared file system on
a cluster). One GPU per worker when the cluster has GPUs; otherwise each worker asks for a
fraction of a CPU so that a small machine is not starved.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from hemblip.errors import HemblipError
from hemblip.train import TrainConfig, TrainResult

__all__ = ["train_distributed"]

_RESULT_FILE = "train_result.json"


def _worker_loop(cfg: dict) -> None:
    import ray
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    from hemblip.train import train

    torch.set_num_threads(int(cfg["threads"]))
    config = TrainConfig.from_json(cfg["config"])
    train_samples = ray.get(cfg["train_ref"])
    val_samples = ray.get(cfg["val_ref"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    result = train(
        config,
        train_samples,
        val_samples,
        log=lambda m: print(f"[rank {rank}] {m}", flush=True),
        report=lambda row: ray.train.report(dict(row)),
        wrap_model=prepare_model,
    )
    if rank == 0:
        summary = {
            "best_val_loss": result.best_val_loss,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "history": result.history,
            "trainable_params": result.trainable_params,
            "total_params": result.total_params,
            "world_size": ctx.get_world_size(),
        }
        (Path(config.out) / _RESULT_FILE).write_text(json.dumps(summary, indent=1))


def train_distributed(
    config: TrainConfig,
    train_samples: Sequence,
    val_samples: Sequence,
    *,
    use_gpu: bool | None = None,
    cpus_per_worker: float = 0.25,
    threads_per_worker: int = 1,
) -> TrainResult:
    """Run :func:`hemblip.train.train` on ``config.workers`` Ray Train workers (≥ 1).

    Connects to the running Ray cluster (or starts a local one). ``use_gpu``: None means "if the
    cluster has GPUs". Returns rank 0's :class:`TrainResult`.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    workers = max(1, config.workers)
    if not ray.is_initialized():
        ray.init()
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    scaling = ScalingConfig(
        num_workers=workers,
        use_gpu=use_gpu,
        resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker},
    )
    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / _RESULT_FILE).unlink(missing_ok=True)
    # Workers must not start nested Ray Train runs: they run the plain loop.
    worker_config = replace(config, out=str(out), workers=0)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "config": worker_config.to_json(),
            "threads": threads_per_worker,
            "train_ref": ray.put(list(train_samples)),
            "val_ref": ray.put(list(val_samples)),
        },
        scaling_config=scaling,
        run_config=RunConfig(name="hemblip-train", storage_path=str(out / "_ray")),
    )
    result = trainer.fit()
    if result.error is not None:
        raise HemblipError(f"distributed training failed: {result.error}") from result.error
    summary_path = out / _RESULT_FILE
    if not summary_path.is_file():
        raise HemblipError(f"distributed training finished without writing {summary_path}")
    s = json.loads(summary_path.read_text())
    return TrainResult(
        out,
        s["best_val_loss"],
        s["best_epoch"],
        s["epochs_run"],
        s["stopped_early"],
        s["history"],
        s["trainable_params"],
        s["total_params"],
    )
