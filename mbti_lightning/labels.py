"""The label vocabulary: MBTI axes, their letters, the 16 types and class ids.

Everything else imports from here. Class ids follow `datasets.ClassLabel` as made by
`class_encode_column`, which sorts the values: within an axis the letters are alphabetical
(E=0, I=1; N=0, S=1; F=0, T=1; J=0, P=1), as in the seed recipe (J=0, P=1).
"""

from __future__ import annotations

import itertools
from typing import Final

#: Axis name -> its two letters, in class-id order.
AXES: Final[dict[str, tuple[str, str]]] = {
    "E-I": ("E", "I"),
    "N-S": ("N", "S"),
    "F-T": ("F", "T"),
    "J-P": ("J", "P"),
}
#: Position of each axis's letter inside a 4-letter type such as "INTJ".
AXIS_POSITION: Final[dict[str, int]] = {axis: i for i, axis in enumerate(AXES)}
#: The 16 types, alphabetical.
TYPES: Final[tuple[str, ...]] = tuple(sorted("".join(t) for t in itertools.product(*AXES.values())))
#: Every label a model of this project can output: the eight letters and the 16 types.
LABELS: Final[frozenset[str]] = frozenset([*itertools.chain(*AXES.values()), *TYPES])


def check_axis(axis: str) -> str:
    """Return `axis` if it names an axis, else raise a ValueError that lists the valid ones."""
    if axis not in AXES:
        raise ValueError(f"unknown MBTI axis {axis!r}; expected one of {', '.join(AXES)}")
    return axis


def heads(target: str | list[str]) -> dict[str, tuple[str, ...]]:
    """What a model predicts for `target`: head name -> its classes in class-id order.

    An axis (``J-P``) gives one binary head; ``all`` or a list of axes one binary head per axis;
    ``mbti`` one 16-way head over the types.
    """
    if target == "mbti":
        return {"mbti": TYPES}
    axes = list(AXES) if target == "all" else [target] if isinstance(target, str) else list(target)
    if not axes or len(set(axes)) != len(axes):
        raise ValueError(f"target {target!r} must name each axis at most once")
    for axis in axes:
        if axis not in AXES:
            raise ValueError(
                f"unknown target {axis!r}; expected an axis ({', '.join(AXES)}), a list of axes, 'all' or 'mbti'"
            )
    return {axis: AXES[axis] for axis in axes}
