"""GPU tier: BLIP-base architecture at full size (random weights, no download) captions in bf16."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def base_captioner():
    from hemblip.inference import Captioner
    from hemblip.model import build_model

    loaded = build_model("blip-base")
    return Captioner(loaded, device="cuda", batch_size=16, max_new_tokens=20, min_new_tokens=20)


def test_blip_base_is_full_size(base_captioner):
    cfg = base_captioner.model.config
    assert cfg.vision_config.image_size == 384 and cfg.vision_config.patch_size == 16
    assert cfg.vision_config.hidden_size == 768 and cfg.text_config.hidden_size == 768
    assert cfg.text_config.vocab_size == 30524
    n = sum(p.numel() for p in base_captioner.model.parameters())
    assert 200e6 < n < 260e6
    assert next(base_captioner.model.parameters()).is_cuda


def test_caption_batch_bf16(base_captioner):
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (24, 224, 224, 3), dtype=np.uint8)
    px = base_captioner.pixel_values(list(crops))
    assert px.shape == (24, 3, 384, 384) and px.is_cuda
    seq, mean_lp = base_captioner.generate(px[:16])
    assert seq.shape == (16, 21)  # [DEC] + 20 forced new tokens
    assert (seq[:, 0] == base_captioner.model.config.text_config.bos_token_id).all()
    assert mean_lp.shape == (16,) and torch.isfinite(mean_lp).all() and (mean_lp <= 0).all()
    results = base_captioner.caption(crops)  # two batches of 16 and 8
    assert len(results) == 24
    assert all(math.isfinite(r.mean_logprob) for r in results)
    assert torch.cuda.max_memory_allocated() > 0


def _bccd_windows(n: int = 16) -> np.ndarray:
    """Real smear content (bundled BCCD fields, MIT): 224 px windows of the first fields."""
    from PIL import Image

    from pipeline.samples import SAMPLE_DATA_DIR

    fields = sorted((SAMPLE_DATA_DIR / "bccd" / "JPEGImages").glob("*.jpg"))[:n]
    return np.stack([np.asarray(Image.open(f).convert("RGB"))[120:344, 200:424] for f in fields])


def test_device_preprocess_cuda_matches_cpu(base_captioner):
    from dataclasses import replace

    from hemblip.preprocess import plan_for

    crops = _bccd_windows()
    plan, _ = plan_for(base_captioner.image_processor)
    cuda = plan(crops, "cuda")
    assert cuda.is_cuda and cuda.dtype == torch.float32 and cuda.shape == (16, 3, 384, 384)
    cuda = cuda.cpu()
    # Same float arithmetic on the CPU; and the processor (bounds of tests/test_inference.py).
    cpu_float = replace(plan, float_kernel=True)(crops, "cpu")
    ref = base_captioner.image_processor(images=list(crops), return_tensors="pt")["pixel_values"]
    for other in (cpu_float, ref):
        d = (cuda - other).abs()
        assert float(d.mean()) < 3e-4 and float(d.max()) < 0.031, (float(d.mean()), float(d.max()))


def test_device_preprocess_uses_pinned_memory(base_captioner):
    from hemblip.preprocess import stage

    crops = _bccd_windows(4)
    assert stage(crops, "cuda").is_pinned() and not stage(crops, "cpu").is_pinned()
    before = torch.cuda.host_memory_stats().get("active_requests.allocated", 0)
    px = base_captioner.pixel_values(crops)
    torch.cuda.synchronize()
    assert px.is_cuda and base_captioner.preprocess == "device"
    assert torch.cuda.host_memory_stats().get("active_requests.allocated", 0) > before
