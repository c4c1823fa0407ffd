"""Attribute-bearing captions: rendering from the ontology and parsing back.

Caption styles (the HemBLIP paper's):

* healthy (WBCAtt attributes): ``"This is an eosinophil from a healthy case, noted for its small
  size, round overall shape, segmented-bilobed nucleus, ..., round red granules."``
* leukemic (LeukemiaAttri attributes): ``"Neutrophil observed in a case of chronic myeloid
  leukemia. Notable features include medium size, regular nuclear shape, ..."``

A caption carrying both groups uses the healthy sentence followed by a ``"Notable features
include ..."`` sentence. The parser reads attribute phrases in any order, accepts the synonyms in
:mod:`hemblip._phrases`, and reports an attribute as ``None`` ("not mentioned") when it is absent,
when its phrase is ambiguous without context, or when the caption gives it two different values.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

from hemblip import _phrases as P
from hemblip.errors import DatasetError
from hemblip.ontology import ATTRIBUTE_NAMES, ATTRIBUTES, CASE_NAMES, CASES, CELL_TYPES

__all__ = [
    "ParsedCaption",
    "render_caption",
    "parse_caption",
    "caption_vocabulary",
    "tokenize_words",
    "detokenize_words",
]

_PUNCT_NO_SPACE_BEFORE = {",", ".", ":"}


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption says: cell type, case code and every ontology attribute (None = not mentioned).

    ``conflicts`` lists attributes the caption gave two different values (reported as None).
    """

    cell_type: str | None
    case: str | None
    attributes: dict[str, str | None]
    conflicts: tuple[str, ...] = field(default=())

    @property
    def mentioned(self) -> dict[str, str]:
        """Only the attributes the caption states."""
        return {k: v for k, v in self.attributes.items() if v is not None}


# --------------------------------------------------------------------------- tokens
def tokenize_words(text: str) -> list[str]:
    """Split text into the caption word tokens: lower-cased, punctuation as separate tokens.

    ``"Segmented-bilobed nucleus, low"`` -> ``["segmented", "-", "bilobed", "nucleus", ",", "low"]``.
    """
    return P.tokenize(text)


def detokenize_words(tokens: list[str]) -> str:
    """Inverse of :func:`tokenize_words` for rendered captions: ``detokenize_words(tokenize_words(
    render_caption(...))) == render_caption(...)`` (spacing and sentence capitals restored)."""
    out: list[str] = []
    glue_next = False
    for tok in tokens:
        if not out:
            out.append(tok)
        elif tok == "-":
            out[-1] += "-"
            glue_next = True
            continue
        elif glue_next or tok in _PUNCT_NO_SPACE_BEFORE:
            out[-1] += tok
        else:
            out.append(tok)
        glue_next = False
    text = " ".join(out)
    return _capitalise_sentences(text)


def _capitalise_sentences(text: str) -> str:
    chars = list(text)
    start = True
    for i, ch in enumerate(chars):
        if start and ch.isalpha():
            chars[i] = ch.upper()
            start = False
        elif ch == ".":
            start = True
    return "".join(chars)


# --------------------------------------------------------------------------- rendering
def _check(cell_type: str | None, case: str | None, attributes: Mapping[str, str | None]) -> None:
    if cell_type is not None and cell_type not in CELL_TYPES:
        raise DatasetError(
            f"unknown cell type {cell_type!r}; expected one of {', '.join(CELL_TYPES)}"
        )
    if case is not None and case not in CASES:
        raise DatasetError(f"unknown case {case!r}; expected one of {', '.join(CASES)}")
    for name, value in attributes.items():
        if name not in ATTRIBUTES:
            raise DatasetError(
                f"unknown attribute {name!r}; expected one of {', '.join(ATTRIBUTE_NAMES)}"
            )
        if value is not None and value not in ATTRIBUTES[name].values:
            raise DatasetError(
                f"attribute {name}: unknown value {value!r}; expected one of "
                f"{'|'.join(ATTRIBUTES[name].values)}"
            )


def _healthy_phrases(attrs: Mapping[str, str | None]) -> list[str]:
    out: list[str] = []
    for name in P.HEALTHY_ORDER:
        if name == "granule_type":
            out += P.granule_phrases(attrs.get("granule_type"), attrs.get("granule_colour"))
        elif attrs.get(name) is not None:
            out.append(P.CANONICAL[(name, attrs[name])])
    return out


def _leukemic_phrases(attrs: Mapping[str, str | None]) -> list[str]:
    return [P.CANONICAL[(n, attrs[n])] for n in P.LEUKEMIC_ORDER if attrs.get(n) is not None]


def render_caption(
    cell_type: str | None, case: str | None, attributes: Mapping[str, str | None] | None = None
) -> str:
    """Render the caption for a cell; only non-None attributes are mentioned.

    ``cell_type`` in :data:`~hemblip.ontology.CELL_TYPES`, ``case`` a code of
    :data:`~hemblip.ontology.CASES`, ``attributes`` ontology name -> value word. Raises
    :class:`~hemblip.errors.DatasetError` naming an unknown cell type, case, attribute or value.
    """
    attributes = dict(attributes or {})
    _check(cell_type, case, attributes)
    healthy = _healthy_phrases(attributes)
    leukemic = _leukemic_phrases(attributes)
    subject = cell_type or "white blood cell"
    if case is None:
        where = ""
    elif case == "healthy":
        where = "healthy case"
    else:
        where = f"case of {CASE_NAMES[case]}"
    if leukemic and not healthy:
        text = subject[:1].upper() + subject[1:] + " observed"
        if where:
            text += f" in a {where}"
        text += "."
    else:
        text = f"This is {P.article(subject)} {subject}"
        if where:
            text += f" from a {where}"
        if healthy:
            text += ", noted for its " + ", ".join(healthy)
        text += "."
    if leukemic:
        text += " Notable features include " + ", ".join(leukemic) + "."
    return text


def caption_vocabulary() -> list[str]:
    """Every word token any :func:`render_caption` output can contain (sorted, lower-case)."""
    words: set[str] = set()
    fixed = (
        "this is a an white blood cell from healthy case of noted for its observed in "
        "notable features include"
    )
    words.update(fixed.split())
    words.update({",", ".", "-"})
    for ct in CELL_TYPES:
        words.update(tokenize_words(ct))
    for name in CASE_NAMES.values():
        words.update(tokenize_words(name))
    for phrase in P.CANONICAL.values():
        words.update(tokenize_words(phrase))
    types = ATTRIBUTES["granule_type"].values + (None,)
    colours = ATTRIBUTES["granule_colour"].values + (None,)
    for t in types:
        for c in colours:
            for phrase in P.granule_phrases(t, c):
                words.update(tokenize_words(phrase))
    return sorted(words)


# --------------------------------------------------------------------------- parsing
_PHRASES = P.build_phrase_table()
_CELL_TYPES = P.cell_type_phrases()
_CASES = P.case_phrases()
_SENTENCE_END = {".", "!", "?", ";"}


def _index(table: Mapping[tuple[str, ...], object]) -> dict[str, tuple[int, ...]]:
    """First token -> phrase lengths starting with it, longest first (so matching is O(tokens))."""
    idx: dict[str, set[int]] = {}
    for key in table:
        idx.setdefault(key[0], set()).add(len(key))
    return {k: tuple(sorted(v, reverse=True)) for k, v in idx.items()}


def _longest_matches(
    tokens: list[str], table: Mapping[tuple[str, ...], object], index: Mapping[str, tuple[int, ...]]
):
    """Greedy left-to-right longest-phrase matches: yields (start, end, value)."""
    i, n_tok = 0, len(tokens)
    while i < n_tok:
        for n in index.get(tokens[i], ()):
            if i + n <= n_tok:
                key = tuple(tokens[i : i + n])
                if key in table:
                    yield i, i + n, table[key]
                    i += n
                    break
        else:
            i += 1


_PHRASE_INDEX, _CELL_TYPE_INDEX, _CASE_INDEX = _index(_PHRASES), _index(_CELL_TYPES), _index(_CASES)


def _group_of(alt: P.Assignment) -> str:
    return ATTRIBUTES[alt[0][0]].group


def _contains(tokens: list[str], seq: tuple[str, ...]) -> bool:
    n = len(seq)
    return any(tuple(tokens[i : i + n]) == seq for i in range(len(tokens) - n + 1))


def _sentences(tokens: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for t in tokens:
        if t in _SENTENCE_END:
            out.append([])
        else:
            out[-1].append(t)
    return [s for s in out if s]


def _sentence_group(sentence: list[str], matches: list[tuple[P.Assignment, ...]]) -> str | None:
    if any(_contains(sentence, m) for m in P.LEUKEMIC_MARKERS):
        return "leukemic"
    if any(_contains(sentence, m) for m in P.HEALTHY_MARKERS):
        return "healthy"
    votes = {"healthy": 0, "leukemic": 0}
    for alts in matches:
        if len(alts) == 1:
            votes[_group_of(alts[0])] += 1
    if votes["healthy"] == votes["leukemic"]:
        return None
    return max(votes, key=votes.__getitem__)


def _single(values: set[str]) -> str | None:
    return next(iter(values)) if len(values) == 1 else None


def parse_caption(text: str) -> ParsedCaption:
    """Recover cell type, case code and every ontology attribute from a caption.

    Works on reference and generated captions: attribute phrases may come in any order and use the
    synonyms of :mod:`hemblip._phrases` (``"large"``/``"big"``, ``"N:C ratio"``, ``"bilobed"``,
    ``"vacuoles present"``, ``AML``, ...). A phrase shared by the healthy and leukemic groups
    (``"small size"``) is resolved by its sentence (``"noted for its"`` = healthy, ``"Notable
    features include"`` = leukemic, otherwise the group of the sentence's unambiguous phrases) and
    left None when that is undecided. Two different values for one attribute give None.
    """
    cell_type, case, values, conflicts = _parse(text)
    return ParsedCaption(
        cell_type=cell_type,
        case=case,
        attributes=dict(zip(ATTRIBUTE_NAMES, values)),
        conflicts=conflicts,
    )


# Generated captions repeat a lot (greedy decoding of similar cells): parse each text once.
@functools.lru_cache(maxsize=65536)
def _parse(text: str) -> tuple[str | None, str | None, tuple[str | None, ...], tuple[str, ...]]:
    tokens = P.fold(tokenize_words(text))
    found: dict[str, set[str]] = {}
    for sentence in _sentences(tokens):
        matches = [alts for _s, _e, alts in _longest_matches(sentence, _PHRASES, _PHRASE_INDEX)]
        group = _sentence_group(sentence, matches) if any(len(a) > 1 for a in matches) else None
        for alts in matches:
            if len(alts) == 1:
                chosen = alts[0]
            else:
                in_group = [a for a in alts if _group_of(a) == group]
                if len(in_group) != 1:
                    continue  # ambiguous without context: not mentioned rather than a guess
                chosen = in_group[0]
            for name, value in chosen:
                found.setdefault(name, set()).add(value)
    values = tuple(_single(found.get(name, set())) for name in ATTRIBUTE_NAMES)
    conflicts = tuple(n for n in ATTRIBUTE_NAMES if len(found.get(n, ())) > 1)
    cell_types = {ct for _s, _e, ct in _longest_matches(tokens, _CELL_TYPES, _CELL_TYPE_INDEX)}
    cases = {c for _s, _e, c in _longest_matches(tokens, _CASES, _CASE_INDEX)}
    cases.update(P.ABBREV_RE.findall(text))
    return _single(cell_types), _single(cases), values, conflicts
