import pytest

from persona_align.data.text import split_sentences


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "I want to learn more about the Navy.I have never been on a frigate.I love England.",
            [
                "I want to learn more about the Navy.",
                "I have never been on a frigate.",
                "I love England.",
            ],
        ),
        (
            "I live in Washington D.C.I like monuments.",
            ["I live in Washington D.C.", "I like monuments."],
        ),
        (
            "I am a fan of Ipswich Town F.C.I love football.",
            ["I am a fan of Ipswich Town F.C.", "I love football."],
        ),
        (
            "I met Dr. Who in St. Paul. I paid 3.5 dollars.",
            ["I met Dr. Who in St. Paul.", "I paid 3.5 dollars."],
        ),
        (
            "I have a Ph.D. in math.I read J.R.R. Tolkien.",
            ["I have a Ph.D. in math.", "I read J.R.R. Tolkien."],
        ),
        (
            "I visited the U.S. last year!Do you travel?",
            ["I visited the U.S. last year!", "Do you travel?"],
        ),
        ("i like cats. my dog is old.i surf.", ["i like cats.", "my dog is old.", "i surf."]),
        ("I like example.com a lot.", ["I like example.com a lot."]),
        ("I like history,I enjoy wine.", ["I like history", "I enjoy wine."]),
        (
            "I find forts interestingI live in the United States.",
            ["I find forts interesting", "I live in the United States."],
        ),
        ("  I am alone  ", ["I am alone"]),
        ("", []),
    ],
)
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected
