"""Masking what gives the label away: type names, their x-variants and cognitive-function jargon."""

from __future__ import annotations

import re

#: What every mention becomes: a token that says nothing about any letter.
PLACEHOLDER = "[MBTI]"

# A letter or an "x" at each position: INTJ, intj, INxJ, xNTP, IxxJ (not xxxx).
_TYPE = r"(?!x{4})[iex][nsx][tfx][jpx]"
# Plurals and possessives: INTJs, INTJS, entj's, INFJ’s, INTPs'.
_SUFFIX = r"(?:s'|s|['’]s)?"
# Ni, Ne, Si, Se, Ti, Te, Fi, Fe as words of their own ("Ni-dom", "Fe/Ti"), never inside one ("fine", "Feel").
_FUNCTION = r"(?-i:[NSTF][ie])"

MENTION = re.compile(rf"\b(?:{_TYPE}{_SUFFIX}|{_FUNCTION}(?:['’]s)?)(?![\w'’])", re.IGNORECASE)


def mask_type_mentions(text: str) -> tuple[str, int]:
    """Replace type mentions in `text` with `PLACEHOLDER`; return the new text and how many there were.

    >>> mask_type_mentions("as an INTJ (or INxJ?) my Ni says the entj's plan is fine")
    ('as an [MBTI] (or [MBTI]?) my [MBTI] says the [MBTI] plan is fine', 4)
    """
    return MENTION.subn(PLACEHOLDER, text)
