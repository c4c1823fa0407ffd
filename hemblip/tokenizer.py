"""Offline word-level tokenizer for small HemBLIP models.

The BERT WordPiece vocabulary that real BLIP checkpoints ship with cannot be downloaded here, so a
model built from a config (``--base tiny``) gets a :class:`transformers.BertTokenizer` whose
vocabulary is exactly the words (and punctuation) that captions can contain. Every word of a
rendered caption is then one token, which keeps sequences short and the output layer small.

Special tokens follow BLIP: ``[PAD]`` (id 0), ``[UNK]``, ``[CLS]``, ``[SEP]`` (end of caption, the
id ``generate`` stops at), ``[MASK]`` and ``[DEC]`` (BLIP's ``bos``: every caption starts with it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = ["SPECIAL_TOKENS", "build_tokenizer", "detokenize", "encode_captions", "vocab_lines"]

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")

# Tokens BERT's pre-tokenizer splits off and that ``decode`` re-joins with spaces around them.
_GLUE_BOTH = re.compile(r"\s*([-/])\s*")
_GLUE_LEFT = re.compile(r"\s+([.,;:!?)])")
_GLUE_RIGHT = re.compile(r"([(])\s+")


def _pieces(words: Iterable[str]) -> list[str]:
    """Split caption words the way BERT's pre-tokenizer will (on spaces and punctuation)."""
    from tokenizers.pre_tokenizers import BertPreTokenizer

    pre = BertPreTokenizer()
    out: list[str] = []
    for w in words:
        out.extend(p for p, _ in pre.pre_tokenize_str(str(w).lower()))
    return out


def build_tokenizer(words: Iterable[str] | None = None):
    """A ``BertTokenizer`` over a word-level vocabulary (special tokens first, then sorted words).

    ``words``: caption words or whole phrases (split on spaces/punctuation here); ``None`` uses
    :func:`hemblip.captions.caption_vocabulary`, i.e. every word a rendered caption can contain.
    """
    from transformers import BertTokenizer

    if words is None:
        from hemblip.captions import caption_vocabulary

        words = caption_vocabulary()
    vocab_words = sorted(set(_pieces(words)) - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + vocab_words)}
    return BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]")


def vocab_lines(tokenizer) -> list[str]:
    """The vocabulary in id order (one token per line of a ``vocab.txt``)."""
    inv = {i: t for t, i in tokenizer.get_vocab().items()}
    return [inv[i] for i in range(len(inv))]


def encode_captions(
    tokenizer, captions: Sequence[str], max_length: int, open_ended: Sequence[bool] | None = None
):
    """Token ids framed as BLIP generates them: ``[DEC] words... [SEP]``, right-padded.

    Returns ``(input_ids, attention_mask, labels)``, int64 tensors of shape (N, L) with
    L ≤ ``max_length``; ``labels`` equals ``input_ids`` with padding set to -100 (ignored).

    ``open_ended[i]`` marks a caption that says only part of what the image shows (a cell-type
    label without attributes): its closing ``.`` and ``[SEP]`` are not supervised, so the model
    learns the cell type from such cells without learning that a description ends after it.
    """
    import torch

    enc = tokenizer(
        list(captions), add_special_tokens=False, truncation=True, max_length=max_length - 2
    )
    bos, sep, pad = tokenizer.bos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    rows = [[bos, *ids, sep] for ids in enc["input_ids"]]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    if open_ended is not None:
        period = tokenizer.convert_tokens_to_ids(".")
        for i, (r, partial) in enumerate(zip(rows, open_ended, strict=True)):
            if partial:
                end = len(r) - 1  # the [SEP]
                labels[i, end] = -100
                if end >= 1 and r[end - 1] == period:
                    labels[i, end - 1] = -100
    return ids, mask, labels


def detokenize(tokenizer, ids: Sequence[int]) -> str:
    """Caption text from generated ids: special tokens dropped, punctuation re-attached.

    ``"segmented - bilobed , blue ."`` becomes ``"Segmented-bilobed, blue."`` so the text is in
    the same form as rendered reference captions.
    """
    tokens = tokenizer.convert_ids_to_tokens([int(i) for i in ids], skip_special_tokens=True)
    tokens = [t for t in tokens if t is not None]
    if not any(t.startswith("##") for t in tokens):
        from hemblip.captions import detokenize_words

        return detokenize_words(tokens) if tokens else ""
    # WordPiece vocabularies (real BLIP checkpoints): let the tokenizer merge "##" pieces.
    text = tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    text = _GLUE_BOTH.sub(r"\1", text)
    text = _GLUE_LEFT.sub(r"\1", text)
    text = _GLUE_RIGHT.sub(r"\1", text)
    text = " ".join(text.split())
    return text[:1].upper() + text[1:]
