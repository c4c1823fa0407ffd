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
    assert not [
        p for p in DEMO_CHECKPOINT.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")
    ]
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
    assert (
        cap.generate_kwargs["num_beams"] == 4 and cap.generate_kwargs["no_repeat_ngram_size"] == 3
    )
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
    assert main(["caption", str(paths[0]), "--preprocess", "processor"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["caption"] == lines[0]["caption"]


def test_caption_cli_bad_model(real_crops, tmp_path, capsys):
    from hemblip.__main__ import main

    paths, _ = real_crops
    rc = main(["caption", str(paths[0]), "--model", str(tmp_path)])
    assert rc == 2 and "not a HemBLIP checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------- device preprocessing
# Bounds measured on the 50 BCCD crops below (224 px, normalised units; one uint8 step of the
# resized image is 1/255/std ~= 0.015): the device path differs from the PIL processor only where
# a rounding lands on the other side of .5 (by one step, rarely two).
#   224->112 (demo):   uint8 kernel mean 4e-6,  max 0.0150; float kernel mean 9e-5, max 0.0150
#   224->384 (base):   uint8 kernel mean 5e-5,  max 0.0300; float kernel mean 6e-6, max 0.0300
_MEAN_BOUND = 3e-4
_MAX_BOUND = 0.031


@pytest.fixture(scope="module")
def bccd_crops():
    """One 224 px crop per WBC box of the bundled BCCD fields (real smears, MIT; see
    pipeline/sample_data/ATTRIBUTION.md): a 360 px square around the box centre, white outside
    the field, resized with PIL as the detection stage hands crops over."""
    from PIL import Image

    from pipeline.samples import SAMPLE_DATA_DIR, read_voc_boxes

    side, crops = 360, []
    for f in sorted((SAMPLE_DATA_DIR / "bccd" / "JPEGImages").glob("*.jpg")):
        img = np.pad(
            np.asarray(Image.open(f).convert("RGB")),
            ((side, side), (side, side), (0, 0)),
            constant_values=255,
        )
        for x0, y0, x1, y1 in read_voc_boxes(
            SAMPLE_DATA_DIR / "bccd" / "Annotations" / f"{f.stem}.xml"
        ):
            cx, cy = (x0 + x1) // 2 + side, (y0 + y1) // 2 + side
            c = img[cy - side // 2 : cy + side // 2, cx - side // 2 : cx + side // 2]
            crops.append(np.asarray(Image.fromarray(c).resize((224, 224), Image.BICUBIC)))
    assert len(crops) >= 40
    return np.stack(crops)


def _diff(a, b) -> tuple[float, float]:
    d = (a - b).abs()
    return float(d.mean()), float(d.max())


def _processor(size, **kwargs):
    from transformers import BlipImageProcessorPil

    size = {"height": size, "width": size} if isinstance(size, int) else size
    return BlipImageProcessorPil(size=size, **kwargs)


@pytest.mark.parametrize(
    "float_kernel", [False, True], ids=["uint8-kernel", "float-kernel-as-cuda"]
)
@pytest.mark.parametrize("size", [None, 384], ids=["demo-112", "blip-base-384"])
def test_device_preprocess_matches_processor(captioner, bccd_crops, size, float_kernel):
    from dataclasses import replace

    from hemblip.preprocess import plan_for

    proc = captioner.image_processor if size is None else _processor(size)
    plan, reason = plan_for(proc)
    assert reason is None
    plan = replace(plan, float_kernel=float_kernel)
    ref = proc(images=list(bccd_crops), return_tensors="pt")["pixel_values"]
    got = plan(bccd_crops, "cpu")
    s = size or 112
    assert got.shape == ref.shape == (len(bccd_crops), 3, s, s) and got.dtype == ref.dtype
    assert got.is_contiguous()
    mean, worst = _diff(got, ref)
    assert mean < _MEAN_BOUND and worst < _MAX_BOUND, (mean, worst)
    # A list of crops gives the same tensor as the stacked array.
    assert torch_equal(plan(list(bccd_crops[:5]), "cpu"), got[:5])


def torch_equal(a, b) -> bool:
    return bool((a == b).all()) and a.shape == b.shape


def test_device_preprocess_bilinear_sizes_and_no_resize(bccd_crops):
    from hemblip.preprocess import plan_for

    # Bilinear, a non-square target, mixed input sizes (processed per size, order kept), and an
    # input already at the target size (no resize: exact up to float rounding).
    proc = _processor({"height": 96, "width": 128}, resample=2)
    plan, _ = plan_for(proc)
    assert plan.mode == "bilinear" and plan.size == (96, 128)
    crops = [bccd_crops[0], bccd_crops[1][:150, :180], bccd_crops[2], bccd_crops[3][:96, :128]]
    got = plan(crops, "cpu")
    ref = proc(images=crops, return_tensors="pt")["pixel_values"]
    assert got.shape == ref.shape == (4, 3, 96, 128)
    mean, worst = _diff(got, ref)
    assert mean < _MEAN_BOUND and worst < _MAX_BOUND, (mean, worst)
    assert _diff(got[3], ref[3])[1] < 1e-5


def test_device_and_processor_captions_agree(bccd_crops):
    device = Captioner(batch_size=64)
    proc = Captioner(batch_size=64, preprocess="processor")
    assert (device.preprocess, proc.preprocess) == ("device", "processor")
    assert device.preprocess_fallback is None
    a, b = device.caption(bccd_crops), proc.caption(list(bccd_crops))
    # Measured: all 50 captions identical, mean log-prob within 1e-5.
    assert [r.caption for r in a] == [r.caption for r in b]
    assert max(abs(x.mean_logprob - y.mean_logprob) for x, y in zip(a, b)) < 1e-3


@pytest.mark.parametrize(
    "change, reason",
    [  # one setting each that the device path lacks
        ({"do_center_crop": True, "crop_size": {"height": 100, "width": 100}}, "do_center_crop"),
        ({"do_pad": True}, "do_pad"),
        ({"resample": 0}, "resample"),
        ({"size": {"shortest_edge": 112}}, "size"),
        ({"reducing_gap": 2.0}, "reducing_gap"),
    ],
)
def test_unreproducible_processor_falls_back(captioner, bccd_crops, change, reason):
    from hemblip.model import LoadedModel
    from hemblip.preprocess import plan_for

    proc = _processor(change.pop("size", 112), **change)
    plan, why = plan_for(proc)
    assert plan is None and reason in why
    loaded = LoadedModel(captioner.model, proc, captioner.tokenizer, "test")
    cap = Captioner(loaded, batch_size=8)
    assert cap.preprocess == "processor" and reason in cap.preprocess_fallback
    crops = list(bccd_crops[:3])
    expected = proc(images=crops, return_tensors="pt")["pixel_values"]
    assert torch_equal(cap.pixel_values(crops), expected)


def test_other_processor_class_falls_back():
    from transformers import BlipImageProcessorPil

    from hemblip.preprocess import plan_for

    class Custom(BlipImageProcessorPil):
        pass

    plan, why = plan_for(Custom())
    assert plan is None and "Custom" in why


def test_preprocess_flag_and_bad_crops_on_device_path(captioner):
    with pytest.raises(HemblipConfigError, match="--preprocess"):
        Captioner(preprocess="gpu")
    assert captioner.preprocess == "device"
    for bad, where in [
        (np.zeros((2, 8, 8, 3), np.float32), "crop 0"),
        (np.zeros((2, 8, 8, 4), np.uint8), "crop 0"),
        (np.zeros((8, 8, 3), np.uint8), "crops"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.int16)], "crop 1"),
    ]:
        with pytest.raises(DatasetError, match=where) as info:
            captioner.caption(bad)
        assert "\n" not in str(info.value)
