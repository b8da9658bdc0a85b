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


#: Words that name types or their parts without being one: what a model must not score by.
JARGON = {
    "mbti",  # also the mask's placeholder, [MBTI]: a row that mentioned a type
    "myers",
    "briggs",
    "introvert",
    "introverts",
    "introverted",
    "introversion",
    "extrovert",
    "extroverts",
    "extroverted",
    "extravert",
    "extraverts",
    "extraverted",
    "extroversion",
    "extraversion",
    "intuitive",
    "intuitives",
    "sensor",
    "sensors",
    "feeler",
    "feelers",
    "thinker",
    "thinkers",
    "judger",
    "judgers",
    "perceiver",
    "perceivers",
}
_WORD = re.compile(rf"(?:{_TYPE}{_SUFFIX}|[nstf][ie](?:['’]s)?)", re.IGNORECASE)


def is_type_vocabulary(text: str) -> bool:
    """Whether a word or n-gram (any case) holds a type, an x-variant, a function code (Ni, fe) or `JARGON`.

    >>> [is_type_vocabulary(w) for w in ("as an intj", "my ni", "introverts", "fine", "plan ahead")]
    [True, True, True, False, False]
    """
    return any(_WORD.fullmatch(word) or word.lower() in JARGON for word in re.findall(r"[\w'’]+", text))
