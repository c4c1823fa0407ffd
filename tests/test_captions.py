"""Captions: rendering in the paper's style, parsing back, vocabulary and tokenisation."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hemblip.captions import (
    ParsedCaption,
    caption_vocabulary,
    detokenize_words,
    parse_caption,
    render_caption,
    tokenize_words,
)
from hemblip.errors import DatasetError
from hemblip.ontology import ATTRIBUTE_NAMES, ATTRIBUTES, CASES, CELL_TYPES

pytestmark = pytest.mark.unit

EOSINOPHIL = {
    "cell_size": "small",
    "cell_shape": "round",
    "nucleus_shape": "segmented-bilobed",
    "nuclear_cytoplasmic_ratio": "low",
    "chromatin_density": "densely",
    "cytoplasm_texture": "clear",
    "cytoplasm_colour": "light blue",
    "granule_type": "round",
    "granule_colour": "red",
}
CML_NEUTROPHIL = {
    "leukemic_cell_size": "medium",
    "nuclear_shape": "regular",
    "nuclear_chromatin": "open",
    "nucleolus": "inconspicuous",
    "cytoplasm": "abundant",
    "cytoplasmic_basophilia": "slight",
}


def _full(attrs):
    return {n: attrs.get(n) for n in ATTRIBUTE_NAMES}


def test_paper_examples_render_exactly():
    assert render_caption("eosinophil", "healthy", EOSINOPHIL) == (
        "This is an eosinophil from a healthy case, noted for its small size, round overall shape, "
        "segmented-bilobed nucleus, low nuclear-to-cytoplasmic ratio, dense chromatin, clear "
        "cytoplasmic texture, light blue cytoplasm, round red granules."
    )
    assert render_caption("neutrophil", "CML", CML_NEUTROPHIL) == (
        "Neutrophil observed in a case of chronic myeloid leukemia. Notable features include "
        "medium size, regular nuclear shape, open nuclear chromatin, inconspicuous nucleolus, "
        "abundant cytoplasm, slight basophilia."
    )


def test_minimal_captions():
    assert render_caption("lymphocyte", None, {}) == "This is a lymphocyte."
    assert render_caption(None, None, {}) == "This is a white blood cell."
    assert render_caption("atypical lymphocyte", "CLL", None) == (
        "This is an atypical lymphocyte from a case of chronic lymphocytic leukemia."
    )
    p = parse_caption("This is a white blood cell.")
    assert p.cell_type is None and p.case is None and p.mentioned == {}


def test_nil_granules_and_dropped_attributes_are_expressible():
    c = render_caption(
        "lymphocyte",
        "healthy",
        {
            "granule_type": "nil",
            "granule_colour": "nil",
            "granularity": "no",
            "cytoplasm_vacuole": "yes",
        },
    )
    assert "no granules" in c and "no granularity" in c and "vacuolated cytoplasm" in c
    p = parse_caption(c)
    assert p.mentioned == {
        "granule_type": "nil",
        "granule_colour": "nil",
        "granularity": "no",
        "cytoplasm_vacuole": "yes",
    }
    c = render_caption(None, "AML", {"cytoplasmic_vacuoles": "prominent"})
    assert parse_caption(c).mentioned == {"cytoplasmic_vacuoles": "prominent"}


def test_every_value_of_every_attribute_round_trips():
    for name, attr in ATTRIBUTES.items():
        for value in attr.values:
            for case in (None, "healthy", "AML"):
                c = render_caption("monocyte", case, {name: value})
                p = parse_caption(c)
                assert p.attributes == _full({name: value}), c
                assert p.cell_type == "monocyte" and p.case == case, c


_attr_strategy = st.fixed_dictionaries(
    {}, optional={n: st.sampled_from(a.values) for n, a in ATTRIBUTES.items()}
)


@settings(max_examples=300, deadline=None)
@given(
    cell_type=st.none() | st.sampled_from(CELL_TYPES),
    case=st.none() | st.sampled_from(CASES),
    attrs=_attr_strategy,
)
def test_render_parse_identity(cell_type, case, attrs):
    c = render_caption(cell_type, case, attrs)
    p = parse_caption(c)
    assert p == ParsedCaption(cell_type, case, _full(attrs)), c
    # the word vocabulary covers every rendering and the word split is reversible
    words = tokenize_words(c)
    assert set(words) <= set(caption_vocabulary())
    assert detokenize_words(words) == c


@settings(max_examples=100, deadline=None)
@given(attrs=_attr_strategy, seed=st.integers(0, 10_000))
def test_attribute_order_does_not_matter(attrs, seed):
    c = render_caption("basophil", "healthy", attrs)
    head, sep, tail = c.partition("noted for its ")
    if not sep:
        return
    body, _, rest = tail.partition(".")
    phrases = body.split(", ")
    random.Random(seed).shuffle(phrases)
    shuffled = head + sep + ", ".join(phrases) + "." + rest
    assert parse_caption(shuffled).attributes == parse_caption(c).attributes


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "Large cell, bilobed nucleus, N:C ratio high, vacuoles present.",
            {
                "cell_size": "big",
                "nucleus_shape": "segmented-bilobed",
                "nuclear_cytoplasmic_ratio": "high",
                "cytoplasm_vacuole": "yes",
            },
        ),
        (
            "big cell with densely condensed chromatin and purple-blue cytoplasm",
            {"cell_size": "big", "chromatin_density": "densely", "cytoplasm_colour": "purple blue"},
        ),
        (
            "noted for its segmented bilobed nucleus, unsegmented round nucleus",  # contradiction
            {},
        ),
        (
            "Blast with prominent nucleoli, scant cytoplasm and moderate cytoplasmic basophilia.",
            {"nucleolus": "prominent", "cytoplasm": "scanty", "cytoplasmic_basophilia": "moderate"},
        ),
        (
            "red round granules, purple blue cytoplasm",
            {"granule_type": "round", "granule_colour": "red", "cytoplasm_colour": "purple blue"},
        ),
        (
            "purple granules and blue cytoplasm",
            {"granule_colour": "purple", "cytoplasm_colour": "blue"},
        ),
        (
            "irregular overall shape, irregular nuclear shape",
            {"cell_shape": "irregular", "nuclear_shape": "irregular"},
        ),
        (
            "Notable features include irregular nucleus, large size.",
            {"nuclear_shape": "irregular", "leukemic_cell_size": "large"},
        ),
        (
            "noted for its irregular nucleus, large size.",
            {"nucleus_shape": "irregular", "cell_size": "big"},
        ),
        (
            "no visible nucleolus, coarse chromatin, coarse granules",
            {"nucleolus": "inconspicuous", "nuclear_chromatin": "coarse", "granule_type": "coarse"},
        ),
    ],
)
def test_synonyms_and_shared_words(text, expected):
    assert parse_caption(text).mentioned == expected


def test_contradiction_is_reported_not_guessed():
    p = parse_caption("noted for its segmented-bilobed nucleus, round nucleus")
    assert p.attributes["nucleus_shape"] is None and p.conflicts == ("nucleus_shape",)


def test_ambiguous_size_without_context_is_not_guessed():
    # "small size" is both WBCAtt cell_size and LeukemiaAttri cell size: no sentence context.
    p = parse_caption("small size")
    assert p.attributes["cell_size"] is None and p.attributes["leukemic_cell_size"] is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "the the the",
        "size small the granules round",
        "nucleus nucleus cytoplasm shape",
        "blue",
        "leukemia cell observed with features",
        "all of them are small",
        "this is a a from from noted for its , , .",
    ],
)
def test_garbled_text_gives_none(text):
    p = parse_caption(text)
    assert p.mentioned == {} and p.case is None and p.cell_type is None


def test_cell_type_and_case_recognition():
    assert parse_caption("Neutrophils seen in AML").cell_type == "neutrophil"
    assert parse_caption("Neutrophils seen in AML").case == "AML"
    assert parse_caption("an atypical lymphocyte").cell_type == "atypical lymphocyte"
    assert parse_caption("a promyelocyte, acute promyelocytic leukaemia").cell_type == (
        "abnormal promyelocyte"
    )
    assert parse_caption("case of acute promyelocytic leukaemia").case == "APML"
    assert parse_caption("a case of ALL").case == "ALL"
    assert parse_caption("a case of all sorts").case is None  # English "all" is not the code
    assert parse_caption("lymphocyte or monocyte").cell_type is None  # two types: no guess
    assert parse_caption("chronic lymphocytic leukemia").cell_type is None


def test_bad_values_are_rejected_with_names():
    with pytest.raises(DatasetError, match="cell_size.*'huge'"):
        render_caption("neutrophil", None, {"cell_size": "huge"})
    with pytest.raises(DatasetError, match="unknown cell type 'platelet'"):
        render_caption("platelet", None, {})
    with pytest.raises(DatasetError, match="unknown case 'MDS'"):
        render_caption(None, "MDS", {})
    with pytest.raises(DatasetError, match="unknown attribute 'colour'"):
        render_caption(None, None, {"colour": "red"})


def test_tokenize_words():
    assert tokenize_words("Segmented-bilobed nucleus, N:C ratio.") == [
        "segmented",
        "-",
        "bilobed",
        "nucleus",
        ",",
        "n",
        ":",
        "c",
        "ratio",
        ".",
    ]
    vocab = caption_vocabulary()
    assert vocab == sorted(set(vocab)) and all(w == w.lower() for w in vocab)
    assert {",", ".", "-", "granules", "nil"} & set(vocab) == {",", ".", "-", "granules"}


_VOCAB = caption_vocabulary() + [
    "big",
    "bilobed",
    "n",
    ":",
    "c",
    "aml",
    "ALL",
    "vacuoles",
    "present",
]


@settings(max_examples=300, deadline=None)
@given(words=st.lists(st.sampled_from(_VOCAB), max_size=40))
def test_parser_never_fails_and_returns_only_ontology_values(words):
    p = parse_caption(" ".join(words))
    assert set(p.attributes) == set(ATTRIBUTE_NAMES)
    for name, value in p.attributes.items():
        assert value is None or value in ATTRIBUTES[name].values
    assert p.cell_type is None or p.cell_type in CELL_TYPES
    assert p.case is None or p.case in CASES
