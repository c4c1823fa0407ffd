"""The HemBLIP attribute ontology: the one source of truth for attribute names and values.

Healthy attributes are WBCAtt's (names and value words exactly as in its CSV columns); leukemic
attributes are LeukemiaAttri's. LeukemiaAttri's ``cell_size`` is renamed ``leukemic_cell_size``
here because its values (small/medium/large) differ from WBCAtt's ``cell_size`` (big/small) and
both become Parquet columns side by side. Captions (``hemblip.captions``) render and parse exactly
these values; the pipeline creates one output column per name in :data:`ATTRIBUTE_NAMES`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Attribute",
    "HEALTHY_ATTRIBUTES",
    "LEUKEMIC_ATTRIBUTES",
    "ATTRIBUTES",
    "ATTRIBUTE_NAMES",
    "CELL_TYPES",
    "NORMAL_CELL_TYPES",
    "ABNORMAL_CELL_TYPES",
    "CASES",
    "CASE_NAMES",
    "LEUKEMIA_ATTRI_FIELDS",
    "cell_type_from_label",
]


@dataclass(frozen=True)
class Attribute:
    """One morphology attribute: its column name, allowed value words and group."""

    name: str
    values: tuple[str, ...]
    group: str  # "healthy" (WBCAtt) or "leukemic" (LeukemiaAttri)

    def __post_init__(self) -> None:
        if self.group not in ("healthy", "leukemic"):
            raise ValueError(
                f"Attribute {self.name}: group must be healthy|leukemic, got {self.group!r}"
            )
        if len(set(self.values)) != len(self.values) or not self.values:
            raise ValueError(f"Attribute {self.name}: values must be unique and non-empty")


HEALTHY_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("cell_size", ("big", "small"), "healthy"),
    Attribute("cell_shape", ("round", "irregular"), "healthy"),
    Attribute(
        "nucleus_shape",
        (
            "segmented-bilobed",
            "segmented-multilobed",
            "unsegmented-band",
            "unsegmented-indented",
            "unsegmented-round",
            "irregular",
        ),
        "healthy",
    ),
    Attribute("nuclear_cytoplasmic_ratio", ("low", "high"), "healthy"),
    Attribute("chromatin_density", ("densely", "loosely"), "healthy"),
    Attribute("cytoplasm_vacuole", ("yes", "no"), "healthy"),
    Attribute("cytoplasm_texture", ("clear", "frosted"), "healthy"),
    Attribute("cytoplasm_colour", ("light blue", "blue", "purple blue"), "healthy"),
    Attribute("granule_type", ("small", "round", "coarse", "nil"), "healthy"),
    Attribute("granule_colour", ("pink", "red", "purple", "nil"), "healthy"),
    Attribute("granularity", ("yes", "no"), "healthy"),
)

LEUKEMIC_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("leukemic_cell_size", ("small", "medium", "large"), "leukemic"),
    Attribute("nuclear_chromatin", ("open", "coarse"), "leukemic"),
    Attribute("nuclear_shape", ("regular", "irregular"), "leukemic"),
    Attribute("nucleolus", ("inconspicuous", "prominent"), "leukemic"),
    Attribute("cytoplasm", ("scanty", "abundant"), "leukemic"),
    Attribute("cytoplasmic_basophilia", ("slight", "moderate"), "leukemic"),
    Attribute("cytoplasmic_vacuoles", ("absent", "prominent"), "leukemic"),
)

ATTRIBUTES: dict[str, Attribute] = {a.name: a for a in HEALTHY_ATTRIBUTES + LEUKEMIC_ATTRIBUTES}
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(ATTRIBUTES)

#: LeukemiaAttri COCO-JSON field name -> ontology attribute name.
LEUKEMIA_ATTRI_FIELDS: dict[str, str] = {
    "cell_size": "leukemic_cell_size",
    "nuclear_chromatin": "nuclear_chromatin",
    "nuclear_shape": "nuclear_shape",
    "nucleolus": "nucleolus",
    "cytoplasm": "cytoplasm",
    "cytoplasmic_basophilia": "cytoplasmic_basophilia",
    "cytoplasmic_vacuoles": "cytoplasmic_vacuoles",
}

NORMAL_CELL_TYPES: tuple[str, ...] = (
    "neutrophil",
    "eosinophil",
    "basophil",
    "lymphocyte",
    "monocyte",
)
ABNORMAL_CELL_TYPES: tuple[str, ...] = (
    "myeloblast",
    "monoblast",
    "lymphoblast",
    "promonocyte",
    "myelocyte",
    "metamyelocyte",
    "abnormal promyelocyte",
    "atypical lymphocyte",
)
CELL_TYPES: tuple[str, ...] = NORMAL_CELL_TYPES + ABNORMAL_CELL_TYPES

#: Case context code -> the words captions use for it.
CASE_NAMES: dict[str, str] = {
    "healthy": "healthy",
    "ALL": "acute lymphoblastic leukemia",
    "AML": "acute myeloid leukemia",
    "APML": "acute promyelocytic leukemia",
    "CLL": "chronic lymphocytic leukemia",
    "CML": "chronic myeloid leukemia",
}
CASES: tuple[str, ...] = tuple(CASE_NAMES)


def cell_type_from_label(label: str) -> str:
    """Map a dataset label (``"Neutrophil"``, ``"NEUTROPHIL"``, ``"atypical_lymphocyte"``) to a cell type.

    Raises ``ValueError`` naming the label when it is not in :data:`CELL_TYPES`.
    """
    key = " ".join(label.strip().lower().replace("_", " ").replace("-", " ").split())
    aliases = {
        "promyelocyte": "abnormal promyelocyte",
        "band neutrophil": "neutrophil",
        "segmented neutrophil": "neutrophil",
        "reactive lymphocyte": "atypical lymphocyte",
    }
    if key.endswith("s") and (key[:-1] in CELL_TYPES or key[:-1] in aliases):
        key = key[:-1]
    key = aliases.get(key, key)
    if key not in CELL_TYPES:
        raise ValueError(
            f"unknown cell type label {label!r}; expected one of {', '.join(CELL_TYPES)}"
        )
    return key
