from pathlib import Path

import pytest

from persona_align.prompting import (
    extract_lenient,
    extract_response,
    extract_strict,
    persobench_messages,
    persobench_prompt,
    prompt_hash,
    render_chat,
)
from persona_align.records import Dialogue

DIALOGUE = Dialogue(
    id="d",
    persona=["I keep bees.", "I fear the sea."],
    context=[
        {"speaker": "User1", "text": "Hi!"},
        {"speaker": "User2", "text": "Hello."},
        {"speaker": "User1", "text": "Any hobbies?"},
    ],
)

VANILLA = """I will provide you with a conversation context and the personas of the participants, that can be annotated with speaker information.
As a participant in this conversation, your task is to generate a personalized response, considering the conversation context and personas.

Participant Personas:
I keep bees. I fear the sea.

Conversation Context:
User1: Hi!
User2: Hello.
User1: Any hobbies?

Task Instruction:
* Provide an unannotated response.
* If only one persona is available, personalize the response accordingly.
* If the conversation context is a single query, respond appropriately to the query.

Output Format: only give a JSON of the following format:
{
  "response": "provide the personalized natural language response here (in 110 words or less)."
}
"""


def test_vanilla_prompt_is_persobench_text() -> None:
    assert persobench_prompt(DIALOGUE) == VANILLA


def test_cot_prompt_adds_reasoning() -> None:
    cot = persobench_prompt(DIALOGUE, "cot", word_limit=60)
    assert (
        "* Apply Chain of Thought reasoning to reflect on the alignment of your response with the personas.\n"
        in cot
    )
    assert (
        '  "reasoning": "briefly describe your personalization process (in 60 words or less)."\n'
        in cot
    )
    assert cot.index('"reasoning"') < cot.index('"response"')
    assert "(in 60 words or less)" in cot and "110" not in cot
    with pytest.raises(ValueError, match="unknown prompt variant"):
        persobench_prompt(DIALOGUE, "zero")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "lenient", "strict"),
    [
        ('{"response": "I keep bees."}', "I keep bees.", "I keep bees."),
        ('  \n{"response": "padded"}\n', "padded", "padded"),
        ('Response:\n{\n  "response": "after a heading"\n}', "after a heading", None),
        ('```json\n{"response": "fenced"}\n```', "fenced", None),
        ('{"reasoning": "x {y}", "response": "nested braces"}', "nested braces", "nested braces"),
        ('{"note": "no key"} then {"response": "second object"}', "second object", None),
        ('{"response": "cut off by the token lim', None, None),
        ('{"response": ""}', None, None),
        ('{"response": ["not", "text"]}', None, None),
        ("plain text reply", None, None),
        ("", None, None),
    ],
)
def test_extraction(raw: str, lenient: str | None, strict: str | None) -> None:
    assert extract_lenient(raw) == lenient
    assert extract_strict(raw) == strict
    assert extract_response(raw) == lenient
    assert extract_response(raw, "strict") == strict


def test_render_through_smollm2_chat_template(smollm2_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)  # a local directory
    text = render_chat(tokenizer, persobench_messages(DIALOGUE, system="Stay in character."))
    assert text.startswith("<|im_start|>system\nStay in character.<|im_end|>\n<|im_start|>user\n")
    assert VANILLA in text
    assert text.endswith("<|im_start|>assistant\n")
    assert prompt_hash(text) != prompt_hash(VANILLA)


def test_render_needs_a_chat_template() -> None:
    class Plain:
        chat_template = None
        name_or_path = "gpt2"

    with pytest.raises(ValueError, match="has no chat template"):
        render_chat(Plain(), persobench_messages(DIALOGUE))
