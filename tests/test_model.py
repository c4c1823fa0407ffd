"""Model building, saving, loading (safetensors only) and the offline tokenizer."""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")

from hemblip.captions import render_caption, tokenize_words  # noqa: E402
from hemblip.errors import CheckpointError, HemblipConfigError, UnsafeCheckpointError  # noqa: E402
from hemblip.model import build_model, is_config_spec, load_model, save_model  # noqa: E402
from hemblip.tokenizer import detokenize, encode_captions  # noqa: E402

pytestmark = pytest.mark.unit

CAPTION = render_caption(
    "eosinophil",
    "healthy",
    {
        "cell_size": "small",
        "cell_shape": "round",
        "nucleus_shape": "segmented-bilobed",
        "nuclear_cytoplasmic_ratio": "low",
        "chromatin_density": "densely",
        "cytoplasm_texture": "clear",
        "cytoplasm_colour": "light blue",
        "granule_type": "round",
        "granule_colour": "red",
        "granularity": "yes",
        "cytoplasm_vacuole": "no",
    },
)


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny")


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_ckpt")
    save_model(tiny.model, tiny.image_processor, tiny.tokenizer, d)
    return d


def _logits(model, tokenizer, px):
    ids, mask, _ = encode_captions(tokenizer, [CAPTION, "This is a basophil."], 64)
    with torch.no_grad():
        return model.eval()(pixel_values=px, input_ids=ids, attention_mask=mask).logits


def test_tokenizer_frames_captions_like_generate(tiny):
    tok = tiny.tokenizer
    ids, mask, labels = encode_captions(tok, [CAPTION, "This is a basophil."], 80)
    assert tok.convert_ids_to_tokens([5])[0] == "[DEC]" and tok.bos_token_id == 5
    assert (ids[:, 0] == tok.bos_token_id).all()
    n = mask.sum(dim=1)
    assert ids[0, n[0] - 1] == tok.sep_token_id and ids[1, n[1] - 1] == tok.sep_token_id
    assert (labels[1, n[1] :] == -100).all() and (labels[mask == 1] == ids[mask == 1]).all()
    assert tok.unk_token_id not in ids.tolist()[0]  # every caption word is in the vocabulary
    # ids -> text gives back the rendered caption exactly (the parser sees reference form)
    assert detokenize(tok, ids[0].tolist()) == CAPTION
    assert len(ids[0]) - 2 == len(tokenize_words(CAPTION))


def test_config_generation_uses_bos_and_sep(tiny):
    cfg = tiny.model.config.text_config
    assert cfg.bos_token_id == tiny.tokenizer.bos_token_id
    assert cfg.sep_token_id == tiny.tokenizer.sep_token_id
    assert cfg.vocab_size == len(tiny.tokenizer)
    assert type(tiny.model).__name__ == "BlipForConditionalGeneration"


def test_save_load_roundtrip_and_version(tiny, tiny_dir, tmp_path):
    loaded = load_model(tiny_dir)
    assert re.fullmatch(r"[0-9a-f]{16}", loaded.version)
    px = torch.randn(2, 3, 64, 64)
    a = _logits(tiny.model, tiny.tokenizer, px)
    b = _logits(loaded.model, loaded.tokenizer, px)
    assert torch.allclose(a, b, atol=1e-6)
    assert loaded.image_processor.size == {"height": 64, "width": 64}
    # A different model gives a different version.
    other = build_model("tiny", seed=1)
    save_model(other.model, other.image_processor, other.tokenizer, tmp_path / "other")
    assert load_model(tmp_path / "other").version != loaded.version


def test_specs():
    assert is_config_spec("tiny") and is_config_spec("config:demo,text_layers=1")
    assert not is_config_spec("some/dir")
    lm = build_model("config:tiny,text_layers=1,image_size=32")
    assert lm.model.config.text_config.num_hidden_layers == 1
    assert lm.image_processor.size["height"] == 32
    with pytest.raises(HemblipConfigError, match="--base"):
        build_model("config:huge")
    with pytest.raises(HemblipConfigError, match="bad override"):
        build_model("config:tiny,colour=3")
    with pytest.raises(HemblipConfigError, match="multiple of patch_size"):
        build_model("config:tiny,image_size=70")


def test_dir_without_weights_lists_missing(tiny_dir, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    for f in tiny_dir.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError) as exc:
        load_model(d)
    msg = str(exc.value)
    assert (
        str(d) in msg
        and "model.safetensors" in msg
        and "config.json" not in msg.split("missing")[1]
    )


def test_empty_dir_lists_everything(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        load_model(tmp_path)
    msg = str(exc.value)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"):
        assert name in msg


def test_missing_location_and_file_location(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_model(tmp_path / "nope")
    f = tmp_path / "file.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_model(f)


def test_pickle_weights_refused_unless_allowed(tiny, tiny_dir, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    for f in tiny_dir.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    torch.save(tiny.model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="pytorch_model.bin"):
        load_model(d)
    loaded = load_model(d, allow_pickle=True)
    px = torch.randn(1, 3, 64, 64)
    assert torch.allclose(
        _logits(tiny.model, tiny.tokenizer, px),
        _logits(loaded.model, loaded.tokenizer, px),
        atol=1e-6,
    )
    assert loaded.weights_files == [d / "pytorch_model.bin"]


def test_safetensors_preferred_over_pickle(tiny_dir, tmp_path):
    d = tmp_path / "both"
    d.mkdir()
    for f in tiny_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "model.pt").write_bytes(b"not even a pickle")  # never touched
    assert load_model(d).weights_files == [d / "model.safetensors"]


def test_corrupt_weights_named(tiny_dir, tmp_path):
    d = tmp_path / "corrupt"
    d.mkdir()
    for f in tiny_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot load weights"):
        load_model(d)
