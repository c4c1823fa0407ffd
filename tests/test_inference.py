"""Captioner on the committed demo checkpoint and the ``caption`` CLI."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

pytest.importorskip("torch")

from hemblip.errors import DatasetError, HemblipConfigError  # noqa: E402
from hemblip.inference import DEMO_CHECKPOINT, Captioner, CaptionResult  # noqa: E402
from hemblip.ontology import ATTRIBUTE_NAMES, CELL_TYPES  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def captioner():
    return Captioner(batch_size=4)


@pytest.fixture(scope="module")
def real_crops(shared_data):
    """Six real white-cell crops of two datasets, as the data readers make them."""
    from PIL import Image

    paths = sorted((shared_data / "segmentation_wbc" / "dataset1").glob("[0-9][0-9][0-9].png"))[:3]
    paths += sorted((shared_data / "segmentation_wbc" / "dataset2").glob("[0-9][0-9][0-9].png"))[:3]
    assert len(paths) == 6
    return paths, [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_demo_checkpoint_is_committed_and_small():
    weights = DEMO_CHECKPOINT / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 20 * 2**20
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json", "MODEL_CARD.md"):
        assert (DEMO_CHECKPOINT / name).is_file(), name
    assert not [p for p in DEMO_CHECKPOINT.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    card = (DEMO_CHECKPOINT / "MODEL_CARD.md").read_text()
    assert "not for clinical use" in card and "GPL-3.0" in card


def test_captioner_on_real_crops(captioner, real_crops):
    _, crops = real_crops
    results = captioner.caption(crops)
    assert captioner.model_id == "hemblip-demo"
    assert re.fullmatch(r"[0-9a-f]{16}", captioner.model_version)
    assert len(results) == len(crops)
    for r in results:
        assert isinstance(r, CaptionResult)
        assert r.caption and r.caption[0].isupper() and "[" not in r.caption
        assert set(r.attributes) == set(ATTRIBUTE_NAMES)
        assert r.cell_type is None or r.cell_type in CELL_TYPES
        assert math.isfinite(r.mean_logprob) and r.mean_logprob <= 0.0
    # The trained model names a cell type for real cells.
    assert sum(r.cell_type is not None for r in results) >= 5


def test_batching_does_not_change_results(captioner, real_crops):
    _, crops = real_crops
    one_batch = Captioner(batch_size=64).caption(np.stack([c[:100, :100] for c in crops]))
    small = captioner.caption([c[:100, :100] for c in crops])  # batches of 4 then 2
    assert [r.caption for r in one_batch] == [r.caption for r in small]
    for a, b in zip(one_batch, small):
        assert abs(a.mean_logprob - b.mean_logprob) < 1e-3


def test_beam_decoding(real_crops):
    _, crops = real_crops
    cap = Captioner(decoding="beam", max_new_tokens=40)
    assert cap.generate_kwargs["num_beams"] == 4 and cap.generate_kwargs["no_repeat_ngram_size"] == 3
    results = cap.caption(crops[:2])
    assert len(results) == 2 and all(r.caption for r in results)
    assert all(math.isfinite(r.mean_logprob) for r in results)


def test_bad_crops_and_settings(captioner):
    with pytest.raises(DatasetError, match="crop 1"):
        captioner.caption([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)])
    with pytest.raises(DatasetError, match="crop 0"):
        captioner.caption([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(HemblipConfigError, match="--decoding"):
        Captioner(decoding="nucleus")
    with pytest.raises(HemblipConfigError, match="--batch-size"):
        Captioner(batch_size=0)
    assert captioner.caption([]) == []


def test_caption_cli(real_crops, tmp_path, capsys):
    from hemblip.__main__ import main

    paths, _ = real_crops
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    missing = tmp_path / "missing.png"
    rc = main(["caption", str(paths[0]), str(broken), str(paths[1]), str(missing)])
    captured = capsys.readouterr()
    assert rc == 1
    lines = [json.loads(x) for x in captured.out.strip().splitlines()]
    assert [x["image"] for x in lines] == [str(paths[0]), str(paths[1])]
    for x in lines:
        assert {"image", "caption", "cell_type", "case", "attributes"} <= set(x)
        assert list(x["attributes"]) == list(ATTRIBUTE_NAMES)
    err = captured.err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith(str(broken)) and err[1].startswith(str(missing))
    assert main(["caption", str(paths[0])]) == 0


def test_caption_cli_bad_model(real_crops, tmp_path, capsys):
    from hemblip.__main__ import main

    paths, _ = real_crops
    rc = main(["caption", str(paths[0]), "--model", str(tmp_path)])
    assert rc == 2 and "not a HemBLIP checkpoint" in capsys.readouterr().err
