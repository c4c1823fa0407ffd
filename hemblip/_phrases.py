"""Phrase tables behind :mod:`hemblip.captions`: canonical renderings and parser synonyms.

Every ontology value has exactly one *canonical* phrase (what ``render_caption`` writes) and any
number of *synonyms* the parser also accepts. A phrase maps to one or more *alternatives*; an
alternative is a tuple of ``(attribute, value)`` assignments. Several alternatives mean the phrase
is shared by the healthy (WBCAtt) and leukemic (LeukemiaAttri) groups (``"small size"`` is both
``cell_size=small`` and ``leukemic_cell_size=small``); the parser resolves those from the
sentence they occur in and otherwise leaves the attribute unmentioned.
"""

from __future__ import annotations

import re

from hemblip.ontology import ATTRIBUTES, CASE_NAMES, CELL_TYPES

Assignment = tuple[tuple[str, str], ...]

_TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
# British spellings and common variants are folded before matching (parser only).
_FOLD = {"leukaemia": "leukemia", "colour": "color", "grey": "gray"}


def tokenize(text: str) -> list[str]:
    """Lower-case word split: runs of letters/digits, every other non-space char its own token."""
    return _TOKEN_RE.findall(text.lower())


def fold(tokens: list[str]) -> list[str]:
    return [_FOLD.get(t, t) for t in tokens]


# --------------------------------------------------------------------------- canonical phrases
#: (attribute, value) -> the phrase render_caption writes.
CANONICAL: dict[tuple[str, str], str] = {
    ("cell_size", "big"): "big size",
    ("cell_size", "small"): "small size",
    ("cell_shape", "round"): "round overall shape",
    ("cell_shape", "irregular"): "irregular overall shape",
    ("nucleus_shape", "segmented-bilobed"): "segmented-bilobed nucleus",
    ("nucleus_shape", "segmented-multilobed"): "segmented-multilobed nucleus",
    ("nucleus_shape", "unsegmented-band"): "unsegmented-band nucleus",
    ("nucleus_shape", "unsegmented-indented"): "unsegmented-indented nucleus",
    ("nucleus_shape", "unsegmented-round"): "unsegmented-round nucleus",
    ("nucleus_shape", "irregular"): "irregular nucleus",
    ("nuclear_cytoplasmic_ratio", "low"): "low nuclear-to-cytoplasmic ratio",
    ("nuclear_cytoplasmic_ratio", "high"): "high nuclear-to-cytoplasmic ratio",
    ("chromatin_density", "densely"): "dense chromatin",
    ("chromatin_density", "loosely"): "loose chromatin",
    ("cytoplasm_vacuole", "yes"): "vacuolated cytoplasm",
    ("cytoplasm_vacuole", "no"): "non-vacuolated cytoplasm",
    ("cytoplasm_texture", "clear"): "clear cytoplasmic texture",
    ("cytoplasm_texture", "frosted"): "frosted cytoplasmic texture",
    ("cytoplasm_colour", "light blue"): "light blue cytoplasm",
    ("cytoplasm_colour", "blue"): "blue cytoplasm",
    ("cytoplasm_colour", "purple blue"): "purple blue cytoplasm",
    # granule_type / granule_colour are rendered together by granule_phrase() below.
    ("granularity", "yes"): "visible granularity",
    ("granularity", "no"): "no granularity",
    ("leukemic_cell_size", "small"): "small size",
    ("leukemic_cell_size", "medium"): "medium size",
    ("leukemic_cell_size", "large"): "large size",
    ("nuclear_chromatin", "open"): "open nuclear chromatin",
    ("nuclear_chromatin", "coarse"): "coarse nuclear chromatin",
    ("nuclear_shape", "regular"): "regular nuclear shape",
    ("nuclear_shape", "irregular"): "irregular nuclear shape",
    ("nucleolus", "inconspicuous"): "inconspicuous nucleolus",
    ("nucleolus", "prominent"): "prominent nucleolus",
    ("cytoplasm", "scanty"): "scanty cytoplasm",
    ("cytoplasm", "abundant"): "abundant cytoplasm",
    ("cytoplasmic_basophilia", "slight"): "slight basophilia",
    ("cytoplasmic_basophilia", "moderate"): "moderate basophilia",
    ("cytoplasmic_vacuoles", "absent"): "absent vacuoles",
    ("cytoplasmic_vacuoles", "prominent"): "prominent vacuoles",
}

#: Order attributes appear in within a caption (the paper's order).
HEALTHY_ORDER = (
    "cell_size",
    "cell_shape",
    "nucleus_shape",
    "nuclear_cytoplasmic_ratio",
    "chromatin_density",
    "cytoplasm_vacuole",
    "cytoplasm_texture",
    "cytoplasm_colour",
    "granule_type",
    "granularity",
)  # granule_colour is rendered with granule_type
LEUKEMIC_ORDER = (
    "leukemic_cell_size",
    "nuclear_shape",
    "nuclear_chromatin",
    "nucleolus",
    "cytoplasm",
    "cytoplasmic_basophilia",
    "cytoplasmic_vacuoles",
)

GRANULE_TYPES = tuple(v for v in ATTRIBUTES["granule_type"].values if v != "nil")
GRANULE_COLOURS = tuple(v for v in ATTRIBUTES["granule_colour"].values if v != "nil")
NO_GRANULES = "no granules"  # both nil
NO_GRANULE_TYPE = "no distinct granule type"  # granule_type nil alone
NO_GRANULE_COLOUR = "no granule colour"  # granule_colour nil alone


def granule_phrases(gtype: str | None, gcolour: str | None) -> list[str]:
    """Canonical phrase(s) for the granule_type/granule_colour pair (0, 1 or 2 phrases)."""
    if gtype == "nil" and gcolour == "nil":
        return [NO_GRANULES]
    out: list[str] = []
    if gtype == "nil":
        out.append(NO_GRANULE_TYPE)
        gtype = None
    if gcolour == "nil":
        out.append(NO_GRANULE_COLOUR)
        gcolour = None
    if gtype and gcolour:
        out.insert(0, f"{gtype} {gcolour} granules")
    elif gtype:
        out.insert(0, f"{gtype} granules")
    elif gcolour:
        out.insert(0, f"{gcolour} granules")
    return out


# --------------------------------------------------------------------------- parser synonyms
_RATIO_NAMES = (
    "nuclear-to-cytoplasmic ratio",
    "nuclear cytoplasmic ratio",
    "nuclear-cytoplasmic ratio",
    "nucleus-to-cytoplasm ratio",
    "nucleus to cytoplasm ratio",
    "n:c ratio",
    "n/c ratio",
    "nc ratio",
    "n-c ratio",
)

# Phrases that are synonyms of exactly one value (besides the canonical phrase).
_SYNONYMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("cell_size", "big"): ("big cell", "big cell size", "big in size"),
    ("cell_size", "small"): (),
    ("cell_shape", "round"): (
        "round shape",
        "round cell shape",
        "rounded shape",
        "round cell",
        "rounded overall shape",
        "round outline",
    ),
    ("cell_shape", "irregular"): (
        "irregular shape",
        "irregular cell shape",
        "irregular cell",
        "irregular outline",
        "irregular cell outline",
    ),
    ("nucleus_shape", "segmented-bilobed"): (
        "bilobed nucleus",
        "bi-lobed nucleus",
        "bilobed",
        "bi-lobed",
        "two-lobed nucleus",
        "bilobed segmented nucleus",
    ),
    ("nucleus_shape", "segmented-multilobed"): (
        "multilobed nucleus",
        "multi-lobed nucleus",
        "multilobed",
        "multi-lobed",
        "hypersegmented nucleus",
    ),
    ("nucleus_shape", "unsegmented-band"): (
        "band nucleus",
        "band-shaped nucleus",
        "band-form nucleus",
        "band shaped nucleus",
    ),
    ("nucleus_shape", "unsegmented-indented"): (
        "indented nucleus",
        "kidney-shaped nucleus",
        "kidney shaped nucleus",
    ),
    ("nucleus_shape", "unsegmented-round"): ("round nucleus", "rounded nucleus"),
    ("nucleus_shape", "irregular"): (),
    ("chromatin_density", "densely"): (
        "densely condensed chromatin",
        "condensed chromatin",
        "densely packed chromatin",
        "dense nuclear chromatin",
        "densely clumped chromatin",
    ),
    ("chromatin_density", "loosely"): (
        "loosely condensed chromatin",
        "loosely packed chromatin",
        "loose nuclear chromatin",
    ),
    ("cytoplasm_vacuole", "yes"): (
        "vacuoles present",
        "vacuolated",
        "with vacuoles",
        "cytoplasmic vacuolation",
        "vacuolation",
        "vacuolated cell",
    ),
    ("cytoplasm_vacuole", "no"): (
        "non-vacuolated",
        "not vacuolated",
        "no vacuolation",
        "nonvacuolated cytoplasm",
        "nonvacuolated",
    ),
    ("cytoplasm_texture", "clear"): ("clear cytoplasm", "clear texture"),
    ("cytoplasm_texture", "frosted"): (
        "frosted cytoplasm",
        "frosted texture",
        "ground-glass cytoplasm",
        "ground glass cytoplasm",
    ),
    ("cytoplasm_colour", "light blue"): (
        "light-blue cytoplasm",
        "pale blue cytoplasm",
        "light blue cytoplasmic color",
        "light blue color",
    ),
    ("cytoplasm_colour", "blue"): ("blue cytoplasmic color", "blue color"),
    ("cytoplasm_colour", "purple blue"): (
        "purple-blue cytoplasm",
        "purplish blue cytoplasm",
        "purple blue cytoplasmic color",
        "purple blue color",
        "purple-blue color",
    ),
    ("granularity", "yes"): (
        "granular cytoplasm",
        "granularity present",
        "granulated cytoplasm",
        "with granularity",
        "visible granulation",
    ),
    ("granularity", "no"): (
        "agranular cytoplasm",
        "agranular",
        "granularity absent",
        "non-granular cytoplasm",
        "without granularity",
        "no granulation",
    ),
    ("leukemic_cell_size", "small"): (),
    ("leukemic_cell_size", "medium"): (
        "medium cell size",
        "medium cell",
        "medium-sized",
        "medium sized",
        "intermediate size",
        "medium in size",
    ),
    ("leukemic_cell_size", "large"): (),
    ("nuclear_chromatin", "open"): ("open chromatin", "fine open chromatin"),
    ("nuclear_chromatin", "coarse"): ("coarse chromatin", "coarsely clumped chromatin"),
    ("nuclear_shape", "regular"): (
        "regular nucleus",
        "regular nuclear outline",
        "regular nuclear contour",
    ),
    ("nuclear_shape", "irregular"): ("irregular nuclear outline", "irregular nuclear contour"),
    ("nucleolus", "inconspicuous"): (
        "inconspicuous nucleoli",
        "no visible nucleolus",
        "no visible nucleoli",
        "nucleolus inconspicuous",
    ),
    ("nucleolus", "prominent"): (
        "prominent nucleoli",
        "visible nucleolus",
        "visible nucleoli",
        "nucleolus prominent",
        "nucleoli prominent",
    ),
    ("cytoplasm", "scanty"): ("scant cytoplasm", "scanty", "little cytoplasm", "sparse cytoplasm"),
    ("cytoplasm", "abundant"): ("plentiful cytoplasm", "ample cytoplasm"),
    ("cytoplasmic_basophilia", "slight"): (
        "slight cytoplasmic basophilia",
        "mild basophilia",
        "mild cytoplasmic basophilia",
        "slightly basophilic",
    ),
    ("cytoplasmic_basophilia", "moderate"): (
        "moderate cytoplasmic basophilia",
        "moderately basophilic",
    ),
    ("cytoplasmic_vacuoles", "absent"): ("absent cytoplasmic vacuoles",),
    ("cytoplasmic_vacuoles", "prominent"): (
        "prominent cytoplasmic vacuoles",
        "prominent vacuolation",
        "vacuoles prominent",
    ),
}

# Phrases shared across the two groups: phrase -> alternatives, resolved by sentence context.
_SHARED: dict[str, tuple[tuple[str, str], ...]] = {}
for _p in ("small size", "small cell", "small cell size", "small in size"):
    _SHARED[_p] = (("cell_size", "small"), ("leukemic_cell_size", "small"))
for _p in ("large size", "large cell", "large cell size", "large in size"):
    _SHARED[_p] = (("cell_size", "big"), ("leukemic_cell_size", "large"))
for _p in ("irregular nucleus",):
    _SHARED[_p] = (("nucleus_shape", "irregular"), ("nuclear_shape", "irregular"))
for _p in ("no vacuoles", "without vacuoles", "vacuoles absent", "no cytoplasmic vacuoles"):
    _SHARED[_p] = (("cytoplasm_vacuole", "no"), ("cytoplasmic_vacuoles", "absent"))


def _variants(phrase: str) -> set[str]:
    """A phrase with hyphens also accepted as spaces (``segmented bilobed``) and closed up."""
    out = {phrase}
    if "-" in phrase:
        out.add(phrase.replace("-", " "))
        out.add(phrase.replace("-", ""))
    return out


def _ratio_phrases() -> dict[tuple[str, str], tuple[str, ...]]:
    return {
        ("nuclear_cytoplasmic_ratio", lvl): tuple(f"{lvl} {n}" for n in _RATIO_NAMES)
        + tuple(f"{n} {lvl}" for n in _RATIO_NAMES)
        for lvl in ("low", "high")
    }


def build_phrase_table() -> dict[tuple[str, ...], tuple[Assignment, ...]]:
    """Token tuple -> alternatives (each a tuple of (attribute, value) assignments)."""
    table: dict[tuple[str, ...], list[Assignment]] = {}

    def add(phrase: str, alt: Assignment) -> None:
        for v in _variants(fold_phrase(phrase)):
            key = tuple(tokenize(v))
            alts = table.setdefault(key, [])
            if alt not in alts:
                alts.append(alt)

    shared_keys = {tuple(tokenize(v)) for p in _SHARED for v in _variants(p)}
    for (attr, value), phrase in CANONICAL.items():
        if tuple(tokenize(phrase)) in shared_keys:
            continue  # added with all its alternatives below
        add(phrase, ((attr, value),))
    for key, phrases in list(_SYNONYMS.items()) + list(_ratio_phrases().items()):
        for phrase in phrases:
            if tuple(tokenize(phrase)) in shared_keys:
                continue
            add(phrase, (key,))
    for phrase, alts in _SHARED.items():
        for alt in alts:
            add(phrase, (alt,))
    # granules: combined type+colour in either order, single words, nil forms
    for t in GRANULE_TYPES:
        add(f"{t} granules", (("granule_type", t),))
        add(f"{t} granule", (("granule_type", t),))
        for c in GRANULE_COLOURS:
            add(f"{t} {c} granules", (("granule_type", t), ("granule_colour", c)))
            add(f"{c} {t} granules", (("granule_type", t), ("granule_colour", c)))
            add(f"{t}, {c} granules", (("granule_type", t), ("granule_colour", c)))
    for c in GRANULE_COLOURS:
        add(f"{c} granules", (("granule_colour", c),))
        add(f"{c} granule", (("granule_colour", c),))
        add(f"{c}-staining granules", (("granule_colour", c),))
    both_nil = (("granule_type", "nil"), ("granule_colour", "nil"))
    for p in (
        NO_GRANULES,
        "without granules",
        "granules absent",
        "no visible granules",
        "absent granules",
    ):
        add(p, both_nil)
    for p in (NO_GRANULE_TYPE, "no granule type"):
        add(p, (("granule_type", "nil"),))
    for p in (NO_GRANULE_COLOUR, "no granule color"):
        add(p, (("granule_colour", "nil"),))
    return {k: tuple(v) for k, v in table.items()}


def fold_phrase(phrase: str) -> str:
    return " ".join(_FOLD.get(w, w) for w in phrase.split(" "))


# --------------------------------------------------------------------------- cell types, cases
def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def cell_type_phrases() -> dict[tuple[str, ...], str]:
    table: dict[tuple[str, ...], str] = {}
    for ct in CELL_TYPES:
        for form in (ct, ct + "s"):
            table[tuple(tokenize(form))] = ct
    aliases = {
        "promyelocyte": "abnormal promyelocyte",
        "promyelocytes": "abnormal promyelocyte",
        "band neutrophil": "neutrophil",
        "segmented neutrophil": "neutrophil",
        "reactive lymphocyte": "atypical lymphocyte",
    }
    for alias, ct in aliases.items():
        table[tuple(tokenize(alias))] = ct
    return table


def case_phrases() -> dict[tuple[str, ...], str]:
    table: dict[tuple[str, ...], str] = {}
    for code, name in CASE_NAMES.items():
        table[tuple(tokenize(name))] = code
        if code != "healthy":
            table[tuple(tokenize(name.replace("leukemia", "leukaemia")))] = code
            # "ALL" is also an English word: abbreviations are matched case-sensitively instead.
            if code != "ALL":
                table[(code.lower(),)] = code
    table[("normal", "case")] = "healthy"
    table[("healthy", "donor")] = "healthy"
    table[("healthy", "individual")] = "healthy"
    return table


ABBREV_RE = re.compile(r"\b(ALL|AML|APML|CLL|CML)\b")

HEALTHY_MARKERS = (("noted", "for"),)
LEUKEMIC_MARKERS = (("notable", "features"), ("features", "include"))
