"""Siblings of issue 11's attacks found while reviewing the fixes: a checkpoint's processor size
as a memory bomb, and credentials in the read side's --s3-endpoint."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.unit


def _tiny(tmp_path):
    from hemblip.model import build_model, save_model

    m = build_model("tiny")
    out = tmp_path / "ckpt"
    save_model(m.model, m.image_processor, m.tokenizer, out)
    return out


@pytest.mark.parametrize(
    "size", [{"height": 60000, "width": 60000}, {"height": 64, "width": 128}, {"shortest_edge": 64}]
)
def test_processor_size_other_than_the_model_input_is_refused(tmp_path, size):
    from hemblip.errors import CheckpointError
    from hemblip.model import load_model

    ckpt = _tiny(tmp_path)
    cfg_path = ckpt / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["size"] = size
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    msg = str(err.value)
    assert "\n" not in msg and "does not match the model's 64 x 64 px input" in msg


def test_processor_that_does_not_resize_is_refused(tmp_path):
    from hemblip.errors import CheckpointError
    from hemblip.model import load_model

    ckpt = _tiny(tmp_path)
    cfg_path = ckpt / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["do_resize"] = False
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do_resize false"):
        load_model(ckpt)


def test_matching_processor_size_still_loads(tmp_path):
    from hemblip.model import load_model

    assert load_model(_tiny(tmp_path)).image_processor.size["height"] == 64


@pytest.mark.parametrize(
    "endpoint", ["http://user:s3cr3t@127.0.0.1:9", "http://127.0.0.1:9/?X-Amz-Signature=s3cr3t"]
)
def test_read_side_endpoint_with_credentials_is_refused_without_echo(endpoint):
    from pipeline.errors import ConfigError
    from pipeline.outputs import _filesystem

    with pytest.raises(ConfigError) as err:
        _filesystem("s3://bucket/out", endpoint)
    assert "s3cr3t" not in str(err.value) and "credential chain" in str(err.value)
