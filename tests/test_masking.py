import pytest

from mbti_lightning.masking import mask_type_mentions


@pytest.mark.parametrize(
    "text, expected, count",
    [
        ("as an INTJ i plan", "as an [MBTI] i plan", 1),
        ("as an intj i plan", "as an [MBTI] i plan", 1),
        ("INTJs and entj's and INFJ’s and ENTPs' debates", "[MBTI] and [MBTI] and [MBTI] and [MBTI] debates", 4),
        ("ISTJ/ISFJ", "[MBTI]/[MBTI]", 2),
        ("(INFP)", "([MBTI])", 1),
        ("probably INxJ or xNTP, maybe IxxJ", "probably [MBTI] or [MBTI], maybe [MBTI]", 3),
        ("my Ni and Fe, Ti-Se loop; Ni's pull", "my [MBTI] and [MBTI], [MBTI]-[MBTI] loop; [MBTI] pull", 5),
    ],
)
def test_mentions_are_masked(text, expected, count):
    assert mask_type_mentions(text) == (expected, count)


@pytest.mark.parametrize(
    "text",
    [
        "fine site Feel Fen Tie Sink",
        "Sis said nine times",
        "intjx xintj",
        "xxxx marks the spot",
        "exit in style",
        "Fe2O3 and NiCd",
    ],
)
def test_ordinary_words_are_left_alone(text):
    assert mask_type_mentions(text) == (text, 0)
