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
