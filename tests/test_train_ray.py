"""Integration: data-parallel training on a real local Ray cluster; loading a checkpoint from S3."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hemblip.captions import render_caption  # noqa: E402
from hemblip.data import CaptionSample  # noqa: E402
from hemblip.errors import CheckpointError  # noqa: E402
from hemblip.model import build_model, load_model, save_model  # noqa: E402
from hemblip.train import TrainConfig  # noqa: E402

pytestmark = pytest.mark.integration


def _samples(n: int, split: str) -> list[CaptionSample]:
    rng = np.random.default_rng(len(split))
    out = []
    for i in range(n):
        cell_type = ("neutrophil", "basophil")[i % 2]
        colour = (200, 120, 160) if cell_type == "neutrophil" else (70, 40, 120)
        img = np.clip(
            np.full((40, 40, 3), colour, np.float32) + rng.normal(0, 8, (40, 40, 3)), 0, 255
        )
        out.append(
            CaptionSample(
                image=img.astype(np.uint8),
                caption=render_caption(cell_type, None, {}),
                cell_type=cell_type,
                case=None,
                attributes={},
                sample_id=f"{split}{i}",
                source="synthetic",
                split=split,
            )
        )
    return out


def test_two_workers_train_tiny_model(ray_cluster, tmp_path):
    from hemblip.train_ray import train_distributed

    config = TrainConfig(
        out=str(tmp_path / "ddp"),
        base="tiny",
        epochs=2,
        batch_size=4,
        lr=3e-3,
        workers=2,
        augment=False,
        seed=0,
    )
    result = train_distributed(config, _samples(16, "train"), _samples(4, "val"), use_gpu=False)
    assert result.epochs_run == 2 and len(result.history) == 2
    # 16 samples over 2 workers in batches of 4: 2 steps per worker per epoch.
    assert result.history[-1]["step"] == 4
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    loaded = load_model(tmp_path / "ddp")
    assert len(loaded.version) == 16
    summary = (tmp_path / "ddp" / "train_result.json").read_text()
    assert '"world_size": 2' in summary


def test_load_checkpoint_from_s3(s3_server, tmp_path, monkeypatch):
    import boto3

    lm = build_model("tiny")
    local = tmp_path / "ckpt"
    save_model(lm.model, lm.image_processor, lm.tokenizer, local)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("HEMBLIP_CACHE", str(tmp_path / "cache"))
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="models")
    for f in local.iterdir():
        s3.upload_file(str(f), "models", f"hemblip/tiny/{f.name}")
    loaded = load_model("s3://models/hemblip/tiny")
    assert loaded.version == load_model(local).version
    cached = tmp_path / "cache" / "s3" / "models" / "hemblip" / "tiny" / "model.safetensors"
    assert cached.is_file()
    # A second load reuses the cache (same bytes, no re-download needed).
    mtime = cached.stat().st_mtime_ns
    load_model("s3://models/hemblip/tiny")
    assert cached.stat().st_mtime_ns == mtime
    with pytest.raises(CheckpointError, match="no objects"):
        load_model("s3://models/nothing-here")
    s3.put_object(Bucket="models", Key="partial/config.json", Body=b"{}")
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_model("s3://models/partial")
    with pytest.raises(CheckpointError, match="s3://no-such-bucket/x"):
        load_model("s3://no-such-bucket/x")
