import pytest
from datasets import Dataset

from mbti_lightning.labels import AXES, TYPES, check_axis, heads


def test_sixteen_types_and_four_axes():
    assert len(TYPES) == 16 and "INTJ" in TYPES and "ESFP" in TYPES
    assert list(AXES) == ["E-I", "N-S", "F-T", "J-P"]


@pytest.mark.parametrize("axis", list(AXES))
def test_class_ids_follow_class_encode_column(axis):
    # The seed gets its ids from datasets' class_encode_column (J=0, P=1); ours must be the same.
    encoded = Dataset.from_dict({"x": list(reversed(AXES[axis]))}).class_encode_column("x")
    assert tuple(encoded.features["x"].names) == AXES[axis]


def test_targets_give_heads():
    assert heads("J-P") == {"J-P": ("J", "P")}
    assert list(heads("all")) == list(AXES) and list(heads(["J-P", "E-I"])) == ["J-P", "E-I"]
    assert heads("mbti") == {"mbti": TYPES}
    with pytest.raises(ValueError, match="unknown target 'J/P'"):
        heads("J/P")
    with pytest.raises(ValueError, match="at most once"):
        heads(["J-P", "J-P"])


def test_unknown_axis_is_named():
    with pytest.raises(ValueError, match="unknown MBTI axis 'J/P'"):
        check_axis("J/P")
