"""PAL (Li et al., arXiv 2511.10215): persona labels, stage-1 mixed-task SFT data, stage-2 pairs.

Stage 1, persona-aware learning, teaches three tasks on the same dialogues:

- ``select``: given the persona set and the history, name the persona sentence the next turn
  should use, or "No personal description." when none fits;
- ``generate-persona``: reply with one persona sentence highlighted;
- ``generate-plain``: reply without any persona (the prompt stage 2 samples rejected replies
  from, so the stage-1 model has seen it).

Stage 2, persona alignment, is DPO with the gold reply as *chosen* and the stage-1 model's own
reply to the no-persona prompt as *rejected*. The pair's prompt is the generate-with-persona
prompt with the gold persona highlighted: the released training script runs DPO with
``data_mode=golden_select_then_generate`` and looks the rejected reply up by its
``generate_for_dpo`` (no-persona) prompt, i.e. the model learns to prefer the persona-grounded
gold turn *when given the persona*, over what it says without one.

The prompts follow the structure of PAL's English prompts (numbered persona set, history,
highlighted sentence) in our own words. With ``response_format="json"`` the generation prompts
end with PersoBench's output-format instruction and the completions are ``{"response": ...}``,
so the trained model's replies go through the same extraction and metrics as every other
system here.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, field_validator
from rich.console import Console

from persona_align.data.nli import LABELS
from persona_align.errors import InputError
from persona_align.generation.base import GenerationParams, Responder
from persona_align.generation.cache import GenerationCache
from persona_align.generation.runner import run_responder
from persona_align.prompting import DEFAULT_WORD_LIMIT, extract_response
from persona_align.records import (
    Candidate,
    Dialogue,
    Message,
    NonEmptyStr,
    PreferencePair,
    SFTExample,
    Turn,
)

NO_PERSONA = "No personal description."
Task = Literal["select", "generate-persona", "generate-plain"]
TASKS: tuple[Task, ...] = ("select", "generate-persona", "generate-plain")
ResponseFormat = Literal["json", "text"]
RULE = "pal"

# (premise, hypothesis) pairs → rows of p(entailment), p(neutral), p(contradiction), in
# persona_align.data.nli.LABELS order: NLIModel.probabilities, or a fake in tests.
NLIScorer = Callable[[Sequence[tuple[str, str]]], Any]


class PersonaLabel(BaseModel):
    """Which persona sentences the gold turn uses, best first; none = "No personal description."

    Stored as JSONL with ``write_records``/``read_records``, so stage 2 reuses stage 1's labels
    instead of running NLI again.
    """

    model_config = ConfigDict(extra="forbid")

    dialogue_id: NonEmptyStr
    indices: list[NonNegativeInt]
    source: Literal["grounding", "nli"]

    @property
    def target(self) -> int | None:
        """The sentence the select task trains on (PAL keeps one label per turn)."""
        return self.indices[0] if self.indices else None


def label_sentence(dialogue: Dialogue, label: PersonaLabel | None) -> str | None:
    """The persona sentence a label points at (None for none), checked against the dialogue."""
    target = label.target if label is not None else None
    if target is None:
        return None
    if target >= len(dialogue.persona):
        raise InputError(
            None,
            f"persona label {target} of dialogue {dialogue.id!r} is out of range "
            f"({len(dialogue.persona)} persona sentences)",
            field="indices",
        )
    return dialogue.persona[target]


def _index_by_id(dialogues: Iterable[Dialogue]) -> dict[str, Dialogue]:
    found: dict[str, Dialogue] = {}
    for dialogue in dialogues:
        if dialogue.id in found:
            raise InputError(None, f"dialogue id {dialogue.id!r} appears twice")
        found[dialogue.id] = dialogue
    return found


def _default_nli() -> NLIScorer:
    from persona_align.metrics.nli import NLIModel

    return NLIModel().probabilities


def label_personas(
    dialogues: Sequence[Dialogue], nli: NLIScorer | None = None
) -> dict[str, PersonaLabel]:
    """Persona labels by dialogue id: the dataset's grounding where it has one, NLI otherwise.

    Without grounding, a persona sentence counts when NLI(premise = sentence, hypothesis = gold
    reply) is most probably an entailment; several are ordered by p(entailment). A dialogue with
    neither grounding nor a gold reply gets no label. ``nli`` defaults to the embedded NLI model
    (``NLIModel().probabilities``), loaded only when some dialogue needs it; pass
    ``functools.partial(model.probabilities, on_batch=...)`` to show progress.
    """
    by_id = _index_by_id(dialogues)
    labels: dict[str, PersonaLabel] = {}
    needs_nli: list[Dialogue] = []
    for dialogue in by_id.values():
        if dialogue.persona_grounding is not None:
            indices = [i for i, used in enumerate(dialogue.persona_grounding) if used]
            labels[dialogue.id] = PersonaLabel(
                dialogue_id=dialogue.id, indices=indices, source="grounding"
            )
        elif dialogue.reference and dialogue.reference.strip():
            needs_nli.append(dialogue)
    if needs_nli:
        scorer = nli or _default_nli()
        pairs = [(s, d.reference or "") for d in needs_nli for s in d.persona]
        probs = np.asarray(scorer(pairs), dtype=float)
        if probs.shape != (len(pairs), len(LABELS)):
            raise ValueError(f"NLI scorer returned shape {probs.shape} for {len(pairs)} pairs")
        entail = LABELS.index("entailment")
        row = 0
        for dialogue in needs_nli:
            block = probs[row : row + len(dialogue.persona)]
            row += len(dialogue.persona)
            entailing = [i for i in range(len(block)) if int(block[i].argmax()) == entail]
            entailing.sort(key=lambda i: -block[i, entail])
            labels[dialogue.id] = PersonaLabel(
                dialogue_id=dialogue.id, indices=entailing, source="nli"
            )
    return {d.id: labels[d.id] for d in by_id.values() if d.id in labels}


# --- prompts -------------------------------------------------------------------------------

_SPEAKER_LINE = (
    "You are taking part in a conversation as the speaker who talks next, and you are given "
    "{given}."
)


def _persona_block(persona: Sequence[str]) -> list[str]:
    return ["Personal descriptions:", *(f"{i}. {s.strip()}" for i, s in enumerate(persona, 1))]


def _history_block(context: Sequence[Turn]) -> list[str]:
    return ["Dialogue history:", *(f"{turn.speaker}: {turn.text}" for turn in context)]


def _format_block(response_format: ResponseFormat, word_limit: int) -> list[str]:
    """PersoBench's output-format lines for json (what ``extract_response`` reads), else plain."""
    if response_format == "json":
        return [
            "Output Format: only give a JSON of the following format:",
            "{",
            f'  "response": "provide your next turn here (in {word_limit} words or less)."',
            "}",
        ]
    return [f"Answer with your next turn only, in {word_limit} words or less."]


def _messages(text_lines: list[str], system: str | None) -> list[Message]:
    messages = [Message(role="system", content=system)] if system else []
    messages.append(Message(role="user", content="\n".join(text_lines) + "\n"))
    return messages


def select_messages(dialogue: Dialogue, system: str | None = None) -> list[Message]:
    """The select prompt: which persona sentence (if any) should the next turn use?"""
    lines = [
        _SPEAKER_LINE.format(given="your personal descriptions and the dialogue so far"),
        "Decide which one of your personal descriptions, if any, your next turn should draw on.",
        f'If none of them is relevant, answer exactly "{NO_PERSONA}"',
        "Otherwise answer with that one personal description, copied exactly, and nothing else.",
        "",
        *_persona_block(dialogue.persona),
        "",
        *_history_block(dialogue.context),
    ]
    return _messages(lines, system)


def persona_messages(
    dialogue: Dialogue,
    highlighted: str | None,
    response_format: ResponseFormat = "json",
    word_limit: int = DEFAULT_WORD_LIMIT,
    system: str | None = None,
) -> list[Message]:
    """The generate-with-persona prompt; ``highlighted=None`` highlights NO_PERSONA."""
    lines = [
        _SPEAKER_LINE.format(
            given="your personal descriptions, the dialogue so far and one highlighted personal "
            "description, the one most relevant to your next turn"
        ),
        f'If the highlighted description is "{NO_PERSONA}", none of them fits this turn.',
        "Write your next turn, drawing on the highlighted personal description when there is one.",
        "",
        *_persona_block(dialogue.persona),
        "",
        *_history_block(dialogue.context),
        "",
        f"Highlighted personal description: {highlighted.strip() if highlighted else NO_PERSONA}",
        "",
        *_format_block(response_format, word_limit),
    ]
    return _messages(lines, system)


def plain_messages(
    dialogue: Dialogue,
    response_format: ResponseFormat = "json",
    word_limit: int = DEFAULT_WORD_LIMIT,
    system: str | None = None,
) -> list[Message]:
    """The no-persona prompt (PAL's ``generate_for_dpo``): the history only."""
    lines = [
        _SPEAKER_LINE.format(given="the dialogue so far"),
        "Write your next turn.",
        "",
        *_history_block(dialogue.context),
        "",
        *_format_block(response_format, word_limit),
    ]
    return _messages(lines, system)


def format_reply(text: str, response_format: ResponseFormat) -> str:
    """A reply as the model should write it: ``{"response": ...}`` JSON or the bare text."""
    if response_format == "json":
        return json.dumps({"response": text.strip()}, ensure_ascii=False)
    return text.strip()


def read_reply(raw: str, response_format: ResponseFormat, params: GenerationParams) -> str | None:
    """The reply in a model output, or None for a failure (no JSON, or nothing at all)."""
    if response_format == "json":
        return extract_response(raw, params.extraction)
    return raw.strip() or None


# --- stage 1: mixed-task SFT data ----------------------------------------------------------


class PALDataConfig(BaseModel):
    """How stage-1 examples are mixed and written.

    ``ratios`` are the shares of each task in the output (missing tasks get 0). Without
    ``max_examples`` the output is the largest mixture the data allows at those shares; each
    dialogue gives at most one example per task. PAL's released "mixture" mode is select +
    generate-persona at 1:1; the default adds some generate-plain so the stage-1 model has seen
    the prompt stage 2 samples rejected replies with.

    ``select_none_share`` is the share of select examples whose answer is "No personal
    description.". Labels lean to none (65% of FoCus turns by NLI), and a select task trained
    on them collapsed to always answering none; the default 0.5 balances none against persona
    answers, leaving out majority examples, so the select task (and the mixture with it) can be
    smaller than the labels allow. None keeps the labels' own share.
    """

    model_config = ConfigDict(extra="forbid")

    ratios: dict[Task, float] = Field(
        default_factory=lambda: {"select": 0.4, "generate-persona": 0.4, "generate-plain": 0.2}
    )
    seed: int = 0
    response_format: ResponseFormat = "json"
    max_examples: int | None = Field(default=None, ge=1)
    word_limit: int = Field(default=DEFAULT_WORD_LIMIT, ge=1)
    system: str | None = None
    select_none_share: float | None = Field(default=0.5, ge=0, le=1)

    @field_validator("ratios")
    @classmethod
    def _check_ratios(cls, ratios: dict[Task, float]) -> dict[Task, float]:
        for task, ratio in ratios.items():
            if not math.isfinite(ratio) or ratio < 0:
                raise ValueError(f"ratio of {task!r} must be a non-negative number, got {ratio}")
        if sum(ratios.values()) <= 0:
            raise ValueError("at least one task ratio must be positive")
        return ratios

    def shares(self) -> dict[Task, float]:
        total = sum(self.ratios.values())
        return {t: self.ratios.get(t, 0.0) / total for t in TASKS}


def mixture_counts(
    available: Mapping[Task, int], shares: Mapping[Task, float], max_examples: int | None
) -> dict[Task, int]:
    """Examples per task: the largest total (≤ max_examples) whose shares fit what is available,
    split by largest remainder so the counts sum to that total."""
    used = [t for t in TASKS if shares.get(t, 0.0) > 0]
    fit = math.floor(min(available.get(t, 0) / shares[t] for t in used) + 1e-9)
    total = fit if max_examples is None else min(max_examples, fit)
    exact = {t: total * shares[t] for t in used}
    counts: dict[Task, int] = {t: 0 for t in TASKS} | {t: math.floor(exact[t]) for t in used}
    by_remainder = sorted(used, key=lambda t: (-(exact[t] - counts[t]), TASKS.index(t)))
    for task in by_remainder[: total - sum(counts.values())]:
        counts[task] = min(counts[task] + 1, available.get(task, 0))
    return counts


def select_capacity(none: int, persona: int, none_share: float) -> int:
    """The most select examples with ``none_share`` of them answering none, each dialogue once."""
    limits = []
    if none_share > 0:
        limits.append(none / none_share)
    if none_share < 1:
        limits.append(persona / (1 - none_share))
    return math.floor(min(limits) + 1e-9)


def _select_sample(
    pool: Sequence[Dialogue],
    labels: Mapping[str, PersonaLabel],
    count: int,
    config: PALDataConfig,
) -> list[Dialogue]:
    """``count`` select dialogues: a seeded sample, with ``select_none_share`` of them (rounded)
    labelled none when that is set."""
    rng = random.Random(f"{config.seed}:select")
    if config.select_none_share is None:
        return rng.sample(list(pool), count)
    none = [d for d in pool if not labels[d.id].indices]
    persona = [d for d in pool if labels[d.id].indices]
    answers_none = round(count * config.select_none_share)
    return rng.sample(none, answers_none) + rng.sample(persona, count - answers_none)


def _example(
    dialogue: Dialogue, task: Task, label: PersonaLabel | None, config: PALDataConfig
) -> SFTExample:
    sentence = label_sentence(dialogue, label)
    if task == "select":
        prompt = select_messages(dialogue, config.system)
        completion = sentence or NO_PERSONA
    elif task == "generate-persona":
        prompt = persona_messages(
            dialogue, sentence, config.response_format, config.word_limit, config.system
        )
        completion = format_reply(dialogue.reference or "", config.response_format)
    else:
        prompt = plain_messages(dialogue, config.response_format, config.word_limit, config.system)
        completion = format_reply(dialogue.reference or "", config.response_format)
    meta: dict[str, Any] = {}
    if label is not None and task != "generate-plain":
        meta = {"persona_index": label.target, "label_source": label.source}
    return SFTExample(
        dialogue_id=dialogue.id,
        prompt=prompt,
        completion=[Message(role="assistant", content=completion)],
        task=task,
        meta=meta,
    )


def build_pal_sft(
    dialogues: Sequence[Dialogue],
    labels: Mapping[str, PersonaLabel],
    config: PALDataConfig | None = None,
) -> tuple[list[SFTExample], dict[str, Any]]:
    """Stage-1 examples mixed at ``config.ratios`` and shuffled, plus a summary for the run.

    A dialogue without a persona label is skipped for the label-dependent tasks, one without a
    gold reply for the generation tasks; the summary counts both per task.
    """
    config = config or PALDataConfig()
    by_id = _index_by_id(dialogues)
    pools: dict[Task, list[Dialogue]] = {t: [] for t in TASKS}
    skipped: dict[Task, Counter[str]] = {t: Counter() for t in TASKS}
    for dialogue in by_id.values():
        has_label = dialogue.id in labels
        has_reply = bool(dialogue.reference and dialogue.reference.strip())
        needs: dict[Task, list[tuple[bool, str]]] = {
            "select": [(has_label, "no_label")],
            "generate-persona": [(has_label, "no_label"), (has_reply, "no_reference")],
            "generate-plain": [(has_reply, "no_reference")],
        }
        for task, checks in needs.items():
            missing = [reason for ok, reason in checks if not ok]
            if missing:
                skipped[task][missing[0]] += 1
            else:
                pools[task].append(dialogue)
    available = {t: len(pools[t]) for t in TASKS}
    none_labels = sum(1 for d in pools["select"] if not labels[d.id].indices)
    share = config.select_none_share
    if share is not None:
        available["select"] = select_capacity(none_labels, available["select"] - none_labels, share)
        if pools["select"] and not available["select"] and config.shares()["select"] > 0:
            raise InputError(
                None,
                f"select_none_share {share} needs both answers, and the persona labels give "
                f"{none_labels} 'none' and {len(pools['select']) - none_labels} persona answers; "
                "set it to null to keep the labels' own share",
                field="pal.data.select_none_share",
            )
    counts = mixture_counts(available, config.shares(), config.max_examples)
    examples = []
    for task in TASKS:
        if task == "select":
            chosen = _select_sample(pools[task], labels, counts[task], config)
        else:
            chosen = random.Random(f"{config.seed}:{task}").sample(pools[task], counts[task])
        examples += [_example(d, task, labels.get(d.id), config) for d in chosen]
    random.Random(config.seed).shuffle(examples)
    select_none = sum(e.task == "select" and e.completion[0].content == NO_PERSONA
                      for e in examples)  # fmt: skip
    label_values = [labels[d] for d in by_id if d in labels]
    summary = {
        "dialogues": len(by_id),
        "labels": {
            "grounding": sum(1 for lab in label_values if lab.source == "grounding"),
            "nli": sum(1 for lab in label_values if lab.source == "nli"),
            "none": sum(1 for lab in label_values if not lab.indices),
            "unlabelled": len(by_id) - len(label_values),
        },
        "available": available,
        "examples": counts,
        "select_answers": {"none": select_none, "persona": counts["select"] - select_none},
        "total": sum(counts.values()),
        "max_examples": config.max_examples,
        "skipped": {t: dict(skipped[t]) for t in TASKS},
    }
    return examples, summary


# --- stage 2: rejected replies and DPO pairs -----------------------------------------------


def generate_rejected(
    dialogues: Sequence[Dialogue],
    responder: Responder,
    params: GenerationParams | None = None,
    config: PALDataConfig | None = None,
    cache: GenerationCache | None = None,
    console: Console | None = None,
) -> list[Candidate]:
    """The stage-1 model's replies to the no-persona prompt, one Candidate per dialogue.

    ``responder`` is normally an ``HFResponder`` over the stage-1 checkpoint. The prompt is
    built from ``config`` (response format, word limit, system message), which must be the one
    stage 1 was trained with; ``params`` sets decoding. Cached replies are reused, so a rerun
    resumes.
    """
    params = params or GenerationParams()
    config = config or PALDataConfig()
    return run_responder(
        dialogues,
        responder,
        params,
        cache,
        console=console,
        prompt=lambda d: plain_messages(
            d, config.response_format, config.word_limit, config.system
        ),
        read=lambda raw: read_reply(raw, config.response_format, params),
        label=f"{responder.name} (no persona)",
    )


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.casefold().split()) == " ".join(b.casefold().split())


def build_pal_pairs(
    dialogues: Sequence[Dialogue],
    candidates: Iterable[Candidate],
    labels: Mapping[str, PersonaLabel],
    config: PALDataConfig | None = None,
) -> tuple[list[PreferencePair], dict[str, Any]]:
    """Stage-2 DPO pairs: chosen = gold reply, rejected = the stage-1 no-persona reply.

    The prompt is the generate-with-persona prompt with the gold persona highlighted (see the
    module docstring). Dropped and counted: failed replies, replies equal to the gold one (case
    and spacing aside), repeated rejected replies of a dialogue, dialogues without a gold reply
    or a persona label. Scores are 1/0 and the weight 1: PAL's DPO is unweighted.
    """
    config = config or PALDataConfig()
    by_id = _index_by_id(dialogues)
    dropped: Counter[str] = Counter()
    pairs: list[PreferencePair] = []
    seen: set[tuple[str, str]] = set()
    for index, candidate in enumerate(candidates, start=1):
        dialogue = by_id.get(candidate.dialogue_id)
        if dialogue is None:
            raise InputError(
                None,
                f"candidate {index} answers unknown dialogue {candidate.dialogue_id!r}",
                field="dialogue_id",
            )
        label = labels.get(dialogue.id)
        reason = None
        if not (dialogue.reference and dialogue.reference.strip()):
            reason = "no_reference"
        elif label is None:
            reason = "no_label"
        elif candidate.response is None:
            reason = "failed"
        elif _same_text(candidate.response, dialogue.reference):
            reason = "same_as_gold"
        elif (dialogue.id, " ".join(candidate.response.casefold().split())) in seen:
            reason = "duplicate"
        if reason is not None:
            dropped[reason] += 1
            continue
        assert label is not None and candidate.response is not None and dialogue.reference
        seen.add((dialogue.id, " ".join(candidate.response.casefold().split())))
        prompt = persona_messages(
            dialogue,
            label_sentence(dialogue, label),
            config.response_format,
            config.word_limit,
            config.system,
        )
        pairs.append(
            PreferencePair(
                dialogue_id=dialogue.id,
                prompt=prompt,
                chosen=[
                    Message(
                        role="assistant",
                        content=format_reply(dialogue.reference, config.response_format),
                    )
                ],
                rejected=[
                    Message(
                        role="assistant",
                        content=format_reply(candidate.response, config.response_format),
                    )
                ],
                score_chosen=1.0,
                score_rejected=0.0,
                weight=1.0,
                rule=RULE,
            )
        )
    summary = {"pairs": len(pairs), "dropped": dict(dropped), "dropped_total": dropped.total()}
    return pairs, summary
