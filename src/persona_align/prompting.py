"""PersoBench prompts, chat-template rendering and JSON response extraction.

The prompt text is PersoBench's (Afzoon et al., 2024) word for word, so that scores measured
here are comparable with the papers'. The only free choice is how persona sentences are
joined (a space; the released CSVs glued them together without one).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Literal

from persona_align.records import Dialogue, Message, Turn

Variant = Literal["vanilla", "cot"]
VARIANTS: tuple[str, ...] = ("vanilla", "cot")
DEFAULT_WORD_LIMIT = 110
# PersoBench's heading (FoCus, the listener's persona) kept word for word; a persona that is
# the responder's own says so, or a model would describe its own traits as the user's.
PERSONA_HEADINGS = {"user": "Participant Personas:", "self": "Your Persona (you are this person):"}


def format_persona(persona: Sequence[str]) -> str:
    return " ".join(sentence.strip() for sentence in persona)


def format_context(context: Sequence[Turn]) -> str:
    return "\n".join(f"{turn.speaker}: {turn.text}" for turn in context)


def persobench_prompt(
    dialogue: Dialogue, variant: Variant = "vanilla", word_limit: int = DEFAULT_WORD_LIMIT
) -> str:
    """The PersoBench zero-shot prompt asking for ``{"response": ...}`` JSON.

    The chain-of-thought variant adds the reflection instruction and a ``"reasoning"`` key,
    exactly as in PersoBench's CoT setting.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown prompt variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    cot = variant == "cot"
    lines = [
        "I will provide you with a conversation context and the personas of the participants, "
        "that can be annotated with speaker information.",
        "As a participant in this conversation, your task is to generate a personalized "
        "response, considering the conversation context and personas.",
        "",
        PERSONA_HEADINGS[dialogue.persona_role],
        format_persona(dialogue.persona),
        "",
        "Conversation Context:",
        format_context(dialogue.context),
        "",
        "Task Instruction:",
        "* Provide an unannotated response.",
        "* If only one persona is available, personalize the response accordingly.",
        "* If the conversation context is a single query, respond appropriately to the query.",
    ]
    if cot:
        lines.append(
            "* Apply Chain of Thought reasoning to reflect on the alignment of your response "
            "with the personas."
        )
    lines += ["", "Output Format: only give a JSON of the following format:", "{"]
    if cot:
        lines.append(
            '  "reasoning": "briefly describe your personalization process '
            f'(in {word_limit} words or less)."'
        )
    lines += [
        '  "response": "provide the personalized natural language response here '
        f'(in {word_limit} words or less)."',
        "}",
    ]
    return "\n".join(lines) + "\n"


def persobench_messages(
    dialogue: Dialogue,
    variant: Variant = "vanilla",
    word_limit: int = DEFAULT_WORD_LIMIT,
    system: str | None = None,
) -> list[Message]:
    """The prompt as chat messages (TRL's conversational format, OpenAI's chat format)."""
    messages = [Message(role="system", content=system)] if system else []
    messages.append(Message(role="user", content=persobench_prompt(dialogue, variant, word_limit)))
    return messages


def render_chat(tokenizer: Any, messages: Sequence[Message]) -> str:
    """Render messages through the model's own chat template, ready for generation."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "use a chat model or send the raw prompt"
        )
    return tokenizer.apply_chat_template(
        [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=True
    )


def prompt_hash(text: str) -> str:
    """A short content hash of the exact text sent to a model (cache key, provenance)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def messages_hash(messages: Sequence[Message]) -> str:
    """The hash of a chat prompt (``Candidate.prompt_hash``), independent of any chat template."""
    return prompt_hash(json.dumps([m.model_dump() for m in messages], ensure_ascii=False))


def _response_of(obj: Any) -> str | None:
    if isinstance(obj, dict):
        value = obj.get("response")
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def extract_strict(raw: str) -> str | None:
    """The whole output (surrounding whitespace aside) is one JSON object with a "response"."""
    try:
        return _response_of(json.loads(raw.strip()))
    except json.JSONDecodeError:
        return None


def extract_lenient(raw: str) -> str | None:
    """The first ``{...}`` in the output that parses as JSON and has a "response" string.

    Models wrap the JSON in prose, headings ("Response:") or code fences; a cut-off JSON
    (the 110-token limit) never parses and so counts as a failure.
    """
    decoder = json.JSONDecoder()
    start = raw.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(raw, start)
        except json.JSONDecodeError:
            obj = None
        response = _response_of(obj)
        if response is not None:
            return response
        start = raw.find("{", start + 1)
    return None


ExtractionMode = Literal["lenient", "strict"]


def extract_response(raw: str, mode: ExtractionMode = "lenient") -> str | None:
    """The reply text of a raw model output, or None when the output is a failure."""
    if mode == "strict":
        return extract_strict(raw)
    if mode == "lenient":
        return extract_lenient(raw)
    raise ValueError(f"unknown extraction mode {mode!r}; choose lenient or strict")


MIN_SHARED_PREFIX = 16  # shorter common token prefixes are not worth computing separately


def shared_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix common to all rows, leaving every row at least one token of
    its own: prompts built from one template share their instructions, whose keys and values
    need computing once (slot decoding, the coherence judge)."""
    shortest = min(len(r) for r in rows)
    keep = 0
    while keep < shortest - 1 and all(r[keep] == rows[0][keep] for r in rows):
        keep += 1
    return keep
