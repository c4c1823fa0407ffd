import csv

import pytest

from hemblip import ontology as o

pytestmark = pytest.mark.unit


def test_attribute_names_are_unique_and_cover_both_groups():
    assert len(o.ATTRIBUTE_NAMES) == len(set(o.ATTRIBUTE_NAMES)) == 18
    assert {a.group for a in o.ATTRIBUTES.values()} == {"healthy", "leukemic"}
    assert set(o.LEUKEMIA_ATTRI_FIELDS.values()) == {a.name for a in o.LEUKEMIC_ATTRIBUTES}


def test_healthy_names_and_values_match_wbcatt_csv(shared_data):
    with open(shared_data / "wbcatt" / "pbc_attr_v1_train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for attr in o.HEALTHY_ATTRIBUTES:
        assert attr.name in rows[0], attr.name
        seen = {r[attr.name] for r in rows}
        assert seen == set(attr.values), (attr.name, seen ^ set(attr.values))


@pytest.mark.parametrize(
    "label,expected",
    [
        ("Neutrophil", "neutrophil"),
        ("Neutrophils", "neutrophil"),
        ("band neutrophils", "neutrophil"),
        ("promyelocytes", "abnormal promyelocyte"),
        ("ATYPICAL_LYMPHOCYTE", "atypical lymphocyte"),
        ("Monocyte", "monocyte"),
    ],
)
def test_cell_type_from_label(label, expected):
    assert o.cell_type_from_label(label) == expected


def test_unknown_label_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown cell type label 'platelet'"):
        o.cell_type_from_label("platelet")


def test_attribute_validation_names_the_attribute():
    with pytest.raises(ValueError, match="Attribute x: group"):
        o.Attribute("x", ("a",), "other")
