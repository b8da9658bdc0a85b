import pytest
from datasets import Dataset

from mbti_lightning.labels import AXES, TYPES, id2label, parse_type, type_to_id


def test_sixteen_types_and_four_axes():
    assert len(TYPES) == 16 and "INTJ" in TYPES and "ESFP" in TYPES
    assert list(AXES) == ["E-I", "N-S", "F-T", "J-P"]


@pytest.mark.parametrize("axis", list(AXES))
def test_class_ids_follow_class_encode_column(axis):
    # The seed gets its ids from datasets' class_encode_column; ours must be the same.
    encoded = Dataset.from_dict({"x": list(reversed(AXES[axis]))}).class_encode_column("x")
    assert dict(enumerate(encoded.features["x"].names)) == id2label(axis)


def test_seed_mapping_for_j_p():
    assert id2label("J-P") == {0: "J", 1: "P"}


@pytest.mark.parametrize("raw", ["intj", "INTJ", " IntJ\n"])
def test_parse_type_any_case(raw):
    assert parse_type(raw) == "INTJ"
    assert type_to_id(raw, "J-P") == 0 and type_to_id(raw, "E-I") == 1


@pytest.mark.parametrize("raw", ["INTX", "intjj", "", None, "xyz1"])
def test_parse_type_rejects_non_types(raw):
    with pytest.raises(ValueError, match="not an MBTI type"):
        parse_type(raw)


def test_unknown_axis_is_named():
    with pytest.raises(ValueError, match="unknown MBTI axis 'J/P'"):
        id2label("J/P")
