"""An LLM judge of persona consistency: a chat model asked with the labelling guidelines.

``--opt c.judge=openai:MODEL@BASE_URL`` sends each (persona, context, reply) to any
OpenAI-compatible server through the ``openai`` responder (bounded concurrency, retries with
backoff, the key read from ``api_key_env`` and never written anywhere) and reads back a label,
1 / 0 / -1. Values are cached by the scorer like every metric's. A call that still fails
after retries is an infrastructure failure: that reply gets no value (null), never a score.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from persona_align.errors import InputError
from persona_align.metrics.base import ScoreItem, Unavailable
from persona_align.prompting import format_context, format_persona, messages_hash
from persona_align.records import Message

GUIDELINES = {
    "user": (
        "The PERSONA describes the USER, the person the assistant talks to. Label how the "
        "assistant's REPLY relates to the persona:\n"
        "1 = the reply explicitly draws on, affirms or personalises with at least one persona "
        "fact (e.g. 'since you love history, ...'), also when it restates the fact in the first "
        "person, and nothing in it conflicts with any persona fact;\n"
        "-1 = something in the reply conflicts with a persona fact: it states or presupposes the "
        "opposite of what the persona says, or ascribes to the user a preference or identity "
        "the persona rules out (not mentioning the persona is NOT a contradiction);\n"
        "0 = the reply neither uses the persona nor conflicts with it (e.g. purely factual)."
    ),
    "self": (
        "The PERSONA is the SPEAKER's own: the REPLY is said by the person who has it. Label "
        "how the reply relates to the persona:\n"
        "1 = the reply expresses, draws on or is clearly implied by at least one persona fact, "
        "and nothing in it conflicts with any persona fact;\n"
        "-1 = something the speaker says about themselves conflicts with a persona fact (not "
        "mentioning the persona is NOT a contradiction; claims about the world are not "
        "contradictions unless they presuppose something the persona rules out);\n"
        "0 = the reply neither uses the persona nor conflicts with it."
    ),
}
INSTRUCTIONS = (
    "You judge persona consistency of dialogue replies, as a careful human reader would.\n"
    "{guidelines}\n"
    "If a reply both uses one persona fact and contradicts another, the label is -1. Judge only "
    'the reply against the persona. Answer with JSON only: {{"label": -1|0|1}}'
)
_LABEL = re.compile(r'"label"\s*:\s*(-?1|0)|(?<![\w.])(-1|0|1)(?!\w|\.\d)')


def parse_label(text: str) -> int | None:
    """The label in a judge's answer: ``{"label": 1}``, or else the first -1/0/1 on its own."""
    try:
        value = json.loads(text.strip().removeprefix("```json").strip("`\n "))
        if isinstance(value, dict) and value.get("label") in (-1, 0, 1):
            return int(value["label"])
    except (json.JSONDecodeError, TypeError):
        pass
    match = _LABEL.search(text)
    return int(match.group(1) or match.group(2)) if match else None


def judge_messages(persona: Sequence[str], role: str, context: str, reply: str) -> list[Message]:
    return [
        Message(role="system", content=INSTRUCTIONS.format(guidelines=GUIDELINES[role])),
        Message(
            role="user",
            content=f"PERSONA: {format_persona(persona)}\n\nCONTEXT:\n{context}\n\nREPLY: {reply}",
        ),
    ]


class LLMJudge:
    """The C labels from a chat model behind an OpenAI-compatible endpoint."""

    def __init__(self, responder: Any) -> None:
        self.responder = responder
        self.name = f"openai:{responder.model}"
        self.failed = 0  # calls that still failed after retries in the last batch

    @classmethod
    def from_spec(cls, spec: Any, task: str, **options: Any) -> LLMJudge:
        """``openai:MODEL@BASE_URL`` (or ``openai:MODEL`` for OpenAI itself) + responder options
        (``api_key_env``, ``concurrency``, ``timeout``, ``max_retries``)."""
        if task != "c":
            raise InputError(None, f"an LLM judge is available for c, not for {task!r}")
        if not isinstance(spec, str) or not spec.startswith("openai:") or spec == "openai:":
            raise InputError(None, f"metric 'c': judge must be openai:MODEL@BASE_URL, got {spec!r}")
        from persona_align.generation.openai_responder import OpenAIResponder, spec_base_url

        model, _, base_url = spec.removeprefix("openai:").partition("@")
        allowed = {"api_key_env", "concurrency", "timeout", "max_retries"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise InputError(None, f"metric 'c' has no option {unknown[0]!r}")
        try:
            return cls(OpenAIResponder(model, base_url=spec_base_url(base_url), **options))
        except TypeError as err:
            raise InputError(None, f"metric 'c': {err}") from None

    def settings(self) -> dict[str, Any]:
        return {"judge": self.responder.settings(), "instructions": INSTRUCTIONS, **GUIDELINES}

    def load(self) -> None:
        try:
            self.responder.prepare()
        except InputError as err:
            raise Unavailable(err.message) from None

    def c_values(self, items: Sequence[ScoreItem]) -> list[float | None]:
        return [None if v is None else float(v) for v in self.labels(
            [(i.dialogue.persona, i.dialogue.persona_role, format_context(i.dialogue.context),
              i.response) for i in items]
        )]  # fmt: skip

    def labels(self, rows: Sequence[tuple[Sequence[str], str, str, str]]) -> list[int | None]:
        """One label per (persona, role, context text, reply); None where the call failed or
        the answer held no label."""
        from persona_align.generation.base import GenerationParams, Request
        from persona_align.records import Dialogue, Turn

        requests = []
        for index, (persona, role, context, reply) in enumerate(rows):
            messages = judge_messages(persona, role, context, reply)
            dialogue = Dialogue(
                id=str(index), persona=list(persona) or ["-"], persona_role=role,  # type: ignore[arg-type]
                context=[Turn(speaker="judge", text="-")],
            )  # fmt: skip
            requests.append(Request(dialogue, messages, messages_hash(messages)))
        found: dict[int, int | None] = {}
        self.failed = 0

        def keep(request: Any, result: Any) -> None:
            if result.error:
                self.failed += 1
            found[int(request.dialogue.id)] = None if result.error else parse_label(result.raw)

        params = GenerationParams(max_new_tokens=16, temperature=0.0)
        self.responder.generate(requests, params, keep)
        return [found.get(i) for i in range(len(rows))]

    def label_values(self, items: Sequence[Any]) -> list[int | None]:
        """For ``judge eval``: labels of JudgeItems, None where the call failed (left out of
        the agreement and counted apart: a server failure is not a judgement)."""
        from persona_align.metrics.judges import persona_sentences

        labels = self.labels(
            [(persona_sentences(i.persona), i.persona_role, i.context, i.reply) for i in items]
        )
        return labels
