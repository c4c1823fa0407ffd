"""Training augmentation: each kind stays within its stated range, is repeatable under a seed, and
only the training split is augmented; class-balanced epochs."""

from __future__ import annotations

import numpy as np
import pytest

from hemblip.augment import (
    AugmentSettings,
    augment_crop,
    centre_field,
    degrade_resolution,
    jpeg_roundtrip,
    parse_kinds,
    stain_jitter,
)
from hemblip.crops import cell_crop
from hemblip.errors import HemblipConfigError

pytestmark = pytest.mark.unit

MPP = 0.12  # µm/px of the synthetic field


def _field(radius_um: float = 6.0, size: int = 900, colour=(120, 60, 170)) -> np.ndarray:
    """A pale smear field with one stained disc in the middle (µm at MPP)."""
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), (232, 212, 214), np.uint8)
    r = radius_um / MPP
    img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r] = colour
    return img


def _disc_radius_px(img: np.ndarray) -> float:
    dark = img.astype(int).sum(axis=2) < 500
    return float(np.sqrt(dark.sum() / np.pi))


def _only(*kinds: str, **kw) -> AugmentSettings:
    return AugmentSettings(kinds=kinds, **kw)


def test_drawn_parameters_stay_within_stated_ranges():
    s = AugmentSettings()
    img = cell_crop(_field(), (450, 450), MPP, crop_um=36 * 1.2, crop_px=120)
    rng = np.random.default_rng(7)
    seen = {"res": 0, "jpeg": 0}
    for _ in range(300):
        out, d = augment_crop(img, rng, s, context=1.2)
        assert out.shape == (100, 100, 3) and out.dtype == np.uint8
        assert 0.8 <= d["f"] <= 1.2
        assert (
            abs(d["shift"][0]) <= 0.04 * 100 * d["f"] and abs(d["shift"][1]) <= 0.04 * 100 * d["f"]
        )
        assert -0.04 <= d["hue"] <= 0.04 and 0.8 <= d["saturation"] <= 1.2
        assert 0.9 <= d["brightness"] <= 1.1 and 0.9 <= d["contrast"] <= 1.1
        assert d["rot90"] in (0, 1, 2, 3)
        if d["resolution_mpp"] is not None:
            seen["res"] += 1
            assert 0.22 <= d["resolution_mpp"] <= 0.28
        if d["jpeg_quality"] is not None:
            seen["jpeg"] += 1
            assert 70 <= d["jpeg_quality"] <= 95
    assert 100 < seen["res"] < 200 and 100 < seen["jpeg"] < 200  # p = 0.5 each


def test_scale_is_the_crop_of_a_slide_with_a_wrong_scale():
    field = _field()
    wide = cell_crop(field, (450, 450), MPP, crop_um=36 * 1.2, crop_px=269)
    rng = np.random.default_rng(3)
    for _ in range(6):
        out, d = augment_crop(wide, rng, _only("scale"), context=1.2, out_px=224)
        # The job at a slide whose stated scale is mpp / f cuts 36 µm / (mpp / f) px of it.
        job = cell_crop(field, (450, 450), MPP / d["f"], crop_um=36, crop_px=224)
        assert np.abs(out.astype(int) - job.astype(int)).mean() < 3.0, d["f"]
        # A cell of radius 6 µm covers 6 / (36 f) of the crop's side.
        assert _disc_radius_px(out) == pytest.approx(224 * 6 / (36 * d["f"]), rel=0.05)


def test_scale_off_leaves_the_job_field():
    wide = cell_crop(_field(), (450, 450), MPP, crop_um=36 * 1.2, crop_px=269)
    out, d = augment_crop(wide, np.random.default_rng(0), _only("stain"), context=1.2, out_px=224)
    assert d["f"] is None and d["shift"] is None
    assert _disc_radius_px(out) == pytest.approx(224 * 6 / 36, rel=0.03)
    # centre_field (what an un-augmented wide training crop is cut to) is the job's crop.
    job = cell_crop(_field(), (450, 450), MPP, crop_um=36, crop_px=224)
    assert np.abs(centre_field(wide, 1.2, 224).astype(int) - job.astype(int)).mean() < 2.0


def test_stain_jitter_shifts_hue_and_saturation_by_the_drawn_amount():
    import cv2

    patch = np.full((8, 8, 3), (150, 90, 190), np.uint8)  # Giemsa violet
    hsv0 = cv2.cvtColor(patch, cv2.COLOR_RGB2HSV_FULL)[0, 0].astype(float)
    for hue, sat in ((0.04, 1.0), (-0.04, 1.0), (0.0, 0.8), (0.0, 1.2)):
        hsv = cv2.cvtColor(stain_jitter(patch, hue, sat), cv2.COLOR_RGB2HSV_FULL)[0, 0].astype(
            float
        )
        dh = (hsv[0] - hsv0[0] + 128) % 256 - 128
        assert dh == pytest.approx(hue * 256, abs=2.5)
        assert hsv[1] == pytest.approx(min(255, hsv0[1] * sat), abs=3)


def test_resolution_degradation_removes_detail_finer_than_the_scan():
    # 36 µm at 224 px; a 1-px checkerboard is detail a 0.25 µm/px scan (144 px) cannot hold.
    yy, xx = np.mgrid[:224, :224]
    board = np.where((yy + xx) % 2 == 0, 230, 40).astype(np.uint8)[..., None].repeat(3, axis=2)
    out = degrade_resolution(board, 36.0, 0.25)
    assert out.shape == board.shape and out.std() < 0.25 * board.std()
    # Coarser than the scan already: nothing to take away.
    small = board[:100, :100]
    assert np.array_equal(degrade_resolution(small, 36.0, 0.25), small)


def test_jpeg_roundtrip_changes_pixels_a_little():
    img = cell_crop(_field(), (450, 450), MPP, crop_px=128)
    out = jpeg_roundtrip(img, 70)
    diff = np.abs(out.astype(int) - img.astype(int))
    assert out.shape == img.shape and diff.max() > 0 and diff.mean() < 4


def test_same_seed_same_augmentation_other_seed_other():
    img = cell_crop(_field(), (450, 450), MPP, crop_um=43.2, crop_px=150)
    s = AugmentSettings()

    def run(seed):
        rng = np.random.default_rng(seed)
        return [augment_crop(img, rng, s, context=1.2)[0].tobytes() for _ in range(5)]

    assert run(11) == run(11)
    assert run(11) != run(12)
    assert len(set(run(11))) == 5


def test_switching_a_kind_off_keeps_the_other_draws():
    img = cell_crop(_field(), (450, 450), MPP, crop_um=43.2, crop_px=150)
    a = augment_crop(img, np.random.default_rng(5), AugmentSettings(), context=1.2)[1]
    b = augment_crop(img, np.random.default_rng(5), _only("scale", "geometry"), context=1.2)[1]
    assert a["f"] == b["f"] and a["rot90"] == b["rot90"] and b["hue"] is None


@pytest.mark.parametrize(
    "kw, flag",
    [
        (dict(kinds="scale,blur"), "--augment"),
        (dict(scale=0.6), "--aug-scale"),
        (dict(hue=float("nan")), "--aug-hue"),
        (dict(saturation=(1.3, 1.1)), "--aug-saturation"),
        (dict(saturation="0.8"), "--aug-saturation"),
        (dict(resolution_mpp=(0.3, 0.2)), "--aug-resolution-mpp"),
        (dict(jpeg_quality=(0, 90)), "--aug-jpeg"),
        (dict(jpeg_p=1.5), "--aug-jpeg-p"),
    ],
)
def test_bad_settings_name_the_flag(kw, flag):
    with pytest.raises(HemblipConfigError, match=flag):
        AugmentSettings(**kw)


def test_parse_kinds():
    assert (
        parse_kinds("all")
        == parse_kinds(True)
        == ("geometry", "scale", "stain", "resolution", "jpeg")
    )
    assert parse_kinds("none") == parse_kinds(False) == parse_kinds("") == ()
    assert parse_kinds("jpeg, scale") == ("scale", "jpeg")  # canonical order


# ----------------------------------------------------------------------------- in the training loop

torch = pytest.importorskip("torch")


def _samples(n: int, cell_type: str, split: str, px: int, colour) -> list:
    from hemblip.captions import render_caption
    from hemblip.data import CaptionSample

    rng = np.random.default_rng(abs(hash((cell_type, split))) % 2**32)
    out = []
    for i in range(n):
        img = np.clip(
            np.full((px, px, 3), colour, np.float32) + rng.normal(0, 8, (px, px, 3)), 0, 255
        )
        out.append(
            CaptionSample(
                image=img.astype(np.uint8),
                caption=render_caption(cell_type, None, {}),
                cell_type=cell_type,
                case=None,
                attributes={},
                sample_id=f"{split}{cell_type}{i}",
                source="synthetic",
                split=split,
            )
        )
    return out


def test_only_the_training_split_is_augmented(tmp_path, monkeypatch):
    import hemblip.augment as aug
    from hemblip.train import TrainConfig, train

    seen: list[tuple] = []
    real = aug.augment_crop

    def spy(image, rng, settings, **kw):
        seen.append(image.shape)
        return real(image, rng, settings, **kw)

    monkeypatch.setattr(aug, "augment_crop", spy)
    # Train crops 48 px, val crops 40 px: a 40-px image reaching the augmenter is a val crop.
    tr = _samples(6, "lymphocyte", "train", 48, (70, 60, 160)) + _samples(
        6, "neutrophil", "train", 48, (200, 150, 190)
    )
    va = _samples(3, "lymphocyte", "val", 40, (70, 60, 160))
    cfg = TrainConfig(
        out=str(tmp_path / "o"),
        base="tiny",
        epochs=2,
        batch_size=4,
        lr=1e-3,
        augment="all",
        warmup_fraction=0.0,
        log_every=100,
    )
    train(cfg, tr, va, log=lambda m: None)
    assert len(seen) == 2 * 12 and all(s[0] == 48 for s in seen)


def test_class_balance_draws_each_type_equally_and_reaches_every_sample():
    from hemblip.model import load_model
    from hemblip.train import TrainConfig, _Batches

    samples = (
        _samples(30, "neutrophil", "train", 24, (200, 150, 190))
        + _samples(6, "lymphocyte", "train", 24, (70, 60, 160))
        + _samples(4, "basophil", "train", 24, (90, 40, 120))
    )
    loaded = load_model("tiny")
    cfg = TrainConfig(out="unused", base="tiny", batch_size=8, augment=False, balance="class")
    b = _Batches(samples, loaded, cfg, False, balance="class")
    assert b.n_per_epoch == 39 and len(b) == 5  # round(40 / 3) = 13 draws per type
    seen_neutrophils: list[int] = []
    rare: list[int] = []
    for epoch in range(1, 7):
        idx = b.epoch_indices(epoch, np.random.default_rng([0, epoch, 0]), shuffle=True)
        types = [samples[i].cell_type for i in idx]
        assert (
            types.count("neutrophil") == types.count("lymphocyte") == types.count("basophil") == 13
        )
        seen_neutrophils += [int(i) for i in idx if samples[i].cell_type == "neutrophil"]
        # each lymphocyte and basophil drawn in every epoch (13 draws over 6 and 4 samples)
        assert all(list(idx).count(i) >= 1 for i in range(30, 40))
        rare += [int(i) for i in idx if i >= 30]
        if epoch == 3:  # 39 draws over 30 neutrophils: every one at least once
            assert set(seen_neutrophils) == set(range(30))
    # 6 x 13 = 78 draws: each neutrophil 2 or 3 times, none left out or favoured
    assert {seen_neutrophils.count(i) for i in range(30)} <= {2, 3}
    assert {rare.count(i) for i in range(30, 36)} == {13} and {
        rare.count(i) for i in range(36, 40)
    } <= {19, 20}
    a = b.epoch_indices(1, np.random.default_rng([0, 1, 0]), shuffle=True)
    assert np.array_equal(a, b.epoch_indices(1, np.random.default_rng([0, 1, 0]), shuffle=True))
    plain = _Batches(
        samples, loaded, TrainConfig(out="unused", base="tiny", batch_size=8, augment=False), False
    )
    assert plain.n_per_epoch == 40
