"""PAL's Select-then-Generate inference: pass 1 picks a persona sentence, pass 2 replies with it.

Pass 1 asks the model the select prompt and maps what it wrote to one persona sentence (or to
none); pass 2 asks the generate-with-persona prompt with that sentence highlighted. The
released PAL code highlights the *gold* label in pass 2 (the predicted selections are loaded
and never used), which measures generation under oracle selection; here pass 2 uses the
model's own prediction, and ``selection="gold"`` reproduces the oracle setting so a benchmark
can report both.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from persona_align.errors import InputError
from persona_align.generation.base import GenerationParams, Result
from persona_align.generation.hf import generate_texts
from persona_align.inference.engine import (
    Reply,
    ReplyError,
    ReplyParams,
    ReplyPolicy,
    Watch,
    register_policy,
)
from persona_align.preference.pal import (
    NO_PERSONA,
    PALDataConfig,
    PersonaLabel,
    label_sentence,
    persona_messages,
    read_reply,
    select_messages,
)
from persona_align.prompting import messages_hash
from persona_align.records import Candidate, Dialogue, Message, NonEmptyStr, Turn

SelectionMode = Literal["predicted", "gold"]
MatchMethod = Literal["exact", "normalised", "overlap", "no-persona", "unmatched", "gold"]
SELECT_MAX_NEW_TOKENS = 48  # persona sentences are short; pass 1 never needs the reply budget
DEFAULT_THRESHOLD = 0.5
RESPONDER_NAME = "pal-stg"


class Selection(BaseModel):
    """What pass 1 produced for one dialogue and which persona sentence it was mapped to."""

    model_config = ConfigDict(extra="forbid")

    dialogue_id: NonEmptyStr
    raw: str
    index: int | None
    selected: str | None
    method: MatchMethod


# --- mapping generated text to a persona sentence ------------------------------------------

_LIST_MARK = re.compile(r"^(?:[-*\u2022]\s*|\(?\d+\s*[.):]\s*)")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019"
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def _normalise(text: str) -> str:
    """First non-empty line, list marker, quotes, case, spacing and end punctuation removed."""
    line = next((part for part in text.strip().splitlines() if part.strip()), "")
    line = line.strip()
    line = (_LIST_MARK.sub("", line).strip() or line).strip(_QUOTES).strip()
    return " ".join(line.casefold().split()).rstrip(".!?;,").strip()


def _tokens(text: str) -> set[str]:
    return set(_WORD.findall(text.casefold().replace("\u2019", "'")))


def token_overlap(a: str, b: str) -> float:
    """F1 of the two texts' word sets (0 when either has no word)."""
    ta, tb = _tokens(a), _tokens(b)
    common = len(ta & tb)
    return 2 * common / (len(ta) + len(tb)) if common else 0.0


def match_persona(
    text: str, persona: Sequence[str], threshold: float = DEFAULT_THRESHOLD
) -> tuple[int | None, MatchMethod]:
    """The persona sentence a pass-1 output names: exact text, then normalised text (a bare
    list number counts too), then the best word-overlap F1 ≥ ``threshold``; else none.

    "No personal description." (normalised, also with trailing words) maps to none.
    """
    stripped = text.strip()
    for i, sentence in enumerate(persona):
        if stripped == sentence.strip():
            return i, "exact"
    norm = _normalise(text)
    if norm.startswith(_normalise(NO_PERSONA)):
        return None, "no-persona"
    if norm.isdigit() and 1 <= int(norm) <= len(persona):
        return int(norm) - 1, "normalised"
    for i, sentence in enumerate(persona):
        if norm and norm == _normalise(sentence):
            return i, "normalised"
    scores = [token_overlap(norm, sentence) for sentence in persona]
    best = max(range(len(persona)), key=scores.__getitem__, default=None)
    if best is not None and scores[best] >= threshold and scores[best] > 0:
        return best, "overlap"
    return None, "unmatched"


# --- Select then Generate ------------------------------------------------------------------


def _select_params(params: GenerationParams) -> GenerationParams:
    """Pass 1 decodes greedily: the selection is a choice, not a text to vary."""
    return replace(
        params, temperature=0.0, max_new_tokens=min(params.max_new_tokens, SELECT_MAX_NEW_TOKENS)
    )


def _run(
    dialogues: Sequence[Dialogue],
    model: Any,
    tokenizer: Any,
    params: GenerationParams,
    selection: SelectionMode,
    labels: Mapping[str, PersonaLabel] | None,
    config: PALDataConfig,
    threshold: float,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[Selection], list[list[Message]], list[Result], list[float]]:
    """Both passes; returns selections, pass-2 prompts, pass-2 results and pass-1 latencies."""
    selections: list[Selection] = []
    pass1_latency = [0.0] * len(dialogues)
    if selection == "gold":
        for dialogue in dialogues:
            label = (labels or {}).get(dialogue.id)
            if label is None:
                raise InputError(
                    None,
                    f"dialogue {dialogue.id!r} has no persona label; selection='gold' needs one",
                )
            selections.append(
                Selection(
                    dialogue_id=dialogue.id,
                    raw="",
                    index=label.target,
                    selected=label_sentence(dialogue, label),
                    method="gold",
                )
            )
    elif selection == "predicted":
        firsts = generate_texts(
            model,
            tokenizer,
            [select_messages(d, config.system) for d in dialogues],
            _select_params(params),
            batch_size,
            on_batch,
        )
        for k, (dialogue, result) in enumerate(zip(dialogues, firsts, strict=True)):
            index, method = match_persona(result.raw, dialogue.persona, threshold)
            pass1_latency[k] = result.latency_s or 0.0
            selections.append(
                Selection(
                    dialogue_id=dialogue.id,
                    raw=result.raw,
                    index=index,
                    selected=dialogue.persona[index] if index is not None else None,
                    method=method,
                )
            )
    else:
        raise InputError(None, f"selection must be 'predicted' or 'gold', got {selection!r}")
    prompts = [
        persona_messages(d, s.selected, config.response_format, config.word_limit, config.system)
        for d, s in zip(dialogues, selections, strict=True)
    ]
    replies = generate_texts(model, tokenizer, prompts, params, batch_size, on_batch)
    return selections, prompts, replies, pass1_latency


def select_then_generate(
    dialogues: Sequence[Dialogue],
    model: Any,
    tokenizer: Any,
    params: GenerationParams | None = None,
    *,
    selection: SelectionMode = "predicted",
    labels: Mapping[str, PersonaLabel] | None = None,
    config: PALDataConfig | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 8,
    name: str = RESPONDER_NAME,
    console: Console | None = None,
) -> tuple[list[Candidate], list[Selection]]:
    """One Candidate per dialogue (in order) and the selection behind each.

    ``selection="predicted"`` uses pass 1's output; ``"gold"`` highlights the label's sentence
    instead (``labels`` required), the oracle setting of PAL's released code. A candidate's
    latency is both passes together; its prompt hash is that of the pass-2 prompt.
    The prompts follow ``config`` (response format, word limit, system message), which must
    be the PAL data config the model was trained with; ``params`` sets decoding.
    """
    params = params or GenerationParams()
    config = config or PALDataConfig()
    passes = 2 if selection == "predicted" else 1
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=console is None,
    ) as progress:
        bar = progress.add_task(f"{name} ({selection} selection)", total=passes * len(dialogues))
        selections, prompts, results, pass1 = _run(
            dialogues,
            model,
            tokenizer,
            params,
            selection,
            labels,
            config,
            threshold,
            batch_size,
            lambda n: progress.advance(bar, n),
        )
    candidates = []
    for dialogue, prompt, result, first in zip(dialogues, prompts, results, pass1, strict=True):
        response = read_reply(result.raw, config.response_format, params)
        candidates.append(
            Candidate(
                dialogue_id=dialogue.id,
                responder=name,
                raw=result.raw,
                response=response,
                valid=response is not None,
                latency_s=first + (result.latency_s or 0.0),
                prompt_hash=messages_hash(prompt),
            )
        )
    return candidates, selections


def selection_accuracy(
    selections: Sequence[Selection], labels: Mapping[str, PersonaLabel]
) -> dict[str, Any]:
    """How often pass 1 picked a labelled sentence, against the persona labels, next to what
    answering without looking would score.

    ``exact_accuracy``: the selected sentence is one the gold turn uses (any of them when the
    label names several), or both say none; ``always_none_exact_accuracy`` is that of always
    answering none (the only constant answer that can be exact; a select task that collapsed to
    the majority answer scores exactly this). ``none_vs_some_accuracy``: pass 1 and the label
    agree on whether any persona sentence applies; ``majority_none_vs_some_accuracy`` is that
    of always giving the labels' majority answer (``majority_class``). Unlabelled dialogues are
    left out and counted; with nothing to compare, accuracies are None (unknown), never 0.
    """
    scored = [(s, labels[s.dialogue_id]) for s in selections if s.dialogue_id in labels]
    exact = sum(
        (s.index in label.indices) if s.index is not None else not label.indices
        for s, label in scored
    )
    none_some = sum((s.index is None) == (not label.indices) for s, label in scored)
    n = len(scored)
    gold_none = sum(1 for _, label in scored if not label.indices)
    return {
        "n": n,
        "exact_accuracy": exact / n if n else None,
        "always_none_exact_accuracy": gold_none / n if n else None,
        "none_vs_some_accuracy": none_some / n if n else None,
        "majority_class": "none" if 2 * gold_none >= n else "persona",
        "majority_none_vs_some_accuracy": max(gold_none, n - gold_none) / n if n else None,
        "unlabelled": len(selections) - n,
        "predicted_none": sum(1 for s, _ in scored if s.index is None),
        "gold_none": gold_none,
        "methods": dict(Counter(s.method for s in selections)),
    }


# --- one reply, for a chat server ----------------------------------------------------------


def _as_turns(context: Sequence[Turn | Message]) -> list[Turn]:
    """Chat messages as dialogue turns: user → User1, assistant → User2, system dropped."""
    speakers = {"user": "User1", "assistant": "User2"}
    turns = []
    for item in context:
        if isinstance(item, Turn):
            turns.append(item)
        elif item.role in speakers and item.content.strip():
            turns.append(Turn(speaker=speakers[item.role], text=item.content))
    return turns


def select_then_generate_one(
    model: Any,
    tokenizer: Any,
    persona: Sequence[str],
    context: Sequence[Turn | Message],
    params: GenerationParams | None = None,
    *,
    config: PALDataConfig | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> tuple[str | None, str, str | None]:
    """(selected persona sentence or None, pass-2 raw output, extracted reply or None)."""
    sentences = [s.strip() for s in persona if s.strip()]
    if not sentences:
        raise InputError(None, "no persona sentences given", field="persona")
    turns = _as_turns(context)
    if not turns:
        raise InputError(None, "no dialogue turns given", field="context")
    params = params or GenerationParams()
    config = config or PALDataConfig()
    dialogue = Dialogue(id="live", persona=sentences, context=turns)
    selections, _, results, _ = _run(
        [dialogue], model, tokenizer, params, "predicted", None, config, threshold, 1
    )
    raw = results[0].raw
    return selections[0].selected, raw, read_reply(raw, config.response_format, params)


@register_policy("select-then-generate")
class SelectThenGenerateReplyPolicy(ReplyPolicy):
    """PAL's inference behind the chat server: pass 1 names the persona sentence to use (the
    model's own choice), pass 2 answers with it highlighted. Both passes go through the
    engine (its model thread, its token counts); the config must match the one stage 1
    trained with."""

    name = "select-then-generate"

    def __init__(
        self, engine: Any, config: PALDataConfig | None = None, threshold: float = DEFAULT_THRESHOLD
    ) -> None:
        super().__init__(engine)
        self.config = config or PALDataConfig()
        self.threshold = threshold

    def validate(self, conversation: Any) -> None:
        if not conversation.persona:
            raise ReplyError(
                "select-then-generate needs a persona: send it as the system message, "
                "one sentence per line",
                param="messages",
            )
        if not conversation.context:
            raise ReplyError("no dialogue turns to answer", param="messages")

    def reply(self, conversation: Any, params: ReplyParams, watch: Watch | None = None) -> Reply:
        self.validate(conversation)
        began = time.perf_counter()
        quiet = watch.quiet() if watch else None  # the content is extracted at the end
        dialogue = Dialogue(id="chat", persona=conversation.persona, context=conversation.context)
        first = self.engine.generate(
            select_messages(dialogue, self.config.system),
            replace(
                params, temperature=0.0, max_tokens=min(params.max_tokens, SELECT_MAX_NEW_TOKENS)
            ),
            quiet,
        )
        index, _ = match_persona(first.raw, dialogue.persona, self.threshold)
        selected = None if index is None else dialogue.persona[index]
        messages = persona_messages(dialogue, selected, self.config.response_format,
                                    self.config.word_limit, self.config.system)  # fmt: skip
        second = self.engine.generate(messages, params, quiet)
        response = read_reply(second.raw, self.config.response_format, GenerationParams())
        return Reply(
            content=second.raw if response is None else response,
            raw=second.raw,
            extracted=response is not None,
            prompt_tokens=first.prompt_tokens + second.prompt_tokens,
            completion_tokens=first.completion_tokens + second.completion_tokens,
            finish_reason=second.finish_reason,
            policy=self.name,
            latency_s=time.perf_counter() - began,
        )
