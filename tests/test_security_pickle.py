"""Opted-in pickle checkpoints that carry code: refused with a one-line CheckpointError.

With ``allow_pickle=True`` torch's restricted unpickler refuses code objects; the refusal must
surface as a one-line ``CheckpointError`` naming the file, and the payload must never run.
"""

from __future__ import annotations

import pytest
from test_security import _copy_without_weights, _write_exploit, tiny_checkpoint  # noqa: F401

pytestmark = pytest.mark.unit


def test_opted_in_malicious_pickle_is_a_one_line_checkpoint_error(tiny_checkpoint, tmp_path):  # noqa: F811
    from hemblip.errors import CheckpointError
    from hemblip.model import load_model

    d = _copy_without_weights(tiny_checkpoint, tmp_path / "pickled")
    marker = tmp_path / "PWNED"
    _write_exploit(d / "pytorch_model.bin", marker)
    with pytest.raises(CheckpointError) as err:
        load_model(d, allow_pickle=True)
    assert "pytorch_model.bin" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()
