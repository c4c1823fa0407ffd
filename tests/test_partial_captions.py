"""Cell-type-only captions are partial supervision: their closing tokens are not trained."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from hemblip.captions import render_caption  # noqa: E402
from hemblip.data import CaptionSample  # noqa: E402
from hemblip.tokenizer import build_tokenizer, encode_captions  # noqa: E402
from hemblip.train import _open_ended  # noqa: E402

pytestmark = pytest.mark.unit


def test_open_ended_captions_leave_period_and_sep_unsupervised():
    tok = build_tokenizer()
    full = render_caption("neutrophil", "healthy", {"cell_size": "big"})
    short = render_caption("neutrophil", None, {})
    ids, mask, labels = encode_captions(tok, [full, short], 72, open_ended=[False, True])
    n_full, n_short = int(mask[0].sum()), int(mask[1].sum())
    # the full caption is supervised to its [SEP]
    assert labels[0, n_full - 1] == tok.sep_token_id
    assert labels[0, n_full - 2] == tok.convert_tokens_to_ids(".")
    # the short one: cell type supervised, "." and [SEP] not
    assert labels[1, n_short - 1] == -100 and labels[1, n_short - 2] == -100
    assert labels[1, n_short - 3] == tok.convert_tokens_to_ids("neutrophil")
    assert ids[1, n_short - 1] == tok.sep_token_id  # input framing unchanged
    # without the flag both are fully supervised
    _, _, plain = encode_captions(tok, [full, short], 72)
    assert plain[1, n_short - 1] == tok.sep_token_id


def test_open_ended_means_no_case_and_no_attribute():
    import numpy as np

    img = np.zeros((4, 4, 3), np.uint8)
    typed = CaptionSample(
        image=img,
        caption="This is a neutrophil.",
        cell_type="neutrophil",
        case=None,
        attributes={},
        sample_id="a",
        source="bccd",
    )
    described = CaptionSample(
        image=img,
        caption="x",
        cell_type="neutrophil",
        case="healthy",
        attributes={"cell_size": "big"},
        sample_id="b",
        source="pbc",
    )
    assert _open_ended(typed) and not _open_ended(described)
