"""SBS training data: gold responses, their one-noun augmentations, and ``Score: s`` prompts.

Score Before You Speak (Saggar et al., ECAI 2025) teaches a model what a score means: the
gold response is shown after ``Score: 1.0``, each augmented response (one noun replaced)
after its similarity to the gold, rounded to two decimals. At inference the prompt asks for
``Score: 1.0``. The base prompt is PersoBench's, so the trained model is evaluated and its
JSON extracted like every other system here.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from persona_align.preference.sbs.fillers import Filler, make_filler
from persona_align.preference.sbs.nouns import Slot, find_slots, load_spacy, vocabulary
from persona_align.preference.sbs.scoring import MetricScorer, Scorer, format_score
from persona_align.prompting import DEFAULT_WORD_LIMIT, persobench_messages
from persona_align.records import Dialogue, Message, SFTExample

TASK = "score-conditioned"
FILL_CHUNK = 64  # slots per filler call: the unit of progress
SCORE_CHUNK = 256


class SBSConfig(BaseModel):
    """How SBS data is built. Everything that changes the output is here; same config, same data.

    ``max_augmentations`` caps the nouns replaced per response (None: every noun, as SBS);
    which ones is drawn with ``seed``. ``pick`` takes a filler's best proposal (``first``, as
    SBS) or a random one (more varied scores). An augmented response that scores as high as
    the original would teach that a changed reply is perfect, so its score is capped at
    ``max_augmented_score``.
    """

    model_config = ConfigDict(extra="forbid")

    spacy_model: str = "embedded-spacy"
    filler: str = "neighbour"
    filler_options: dict[str, Any] = Field(default_factory=dict)
    pick: Literal["first", "random"] = "first"
    scorer: str = "embedding"
    scorer_options: dict[str, Any] = Field(default_factory=dict)
    max_augmentations: int | None = Field(None, ge=0)
    max_augmented_score: float = Field(0.99, le=1.0)
    seed: int = 0
    response_format: Literal["json", "text"] = "json"
    include_originals: bool = True
    word_limit: int = Field(DEFAULT_WORD_LIMIT, ge=1)
    system: str | None = None


def append_score(messages: Sequence[Message], score: float) -> list[Message]:
    """The messages with ``Score: s`` on its own line at the end of the last user turn."""
    out = [m.model_copy() for m in messages]
    last = max((i for i, m in enumerate(out) if m.role == "user"), default=None)
    if last is None:
        raise ValueError("SBS needs a user turn to carry the score")
    out[last] = Message(
        role="user", content=f"{out[last].content.rstrip()}\nScore: {format_score(score)}"
    )
    return out


def sbs_messages(
    dialogue: Dialogue,
    score: float = 1.0,
    word_limit: int = DEFAULT_WORD_LIMIT,
    system: str | None = None,
) -> list[Message]:
    """The SBS prompt: PersoBench's, asking for a reply of quality ``score`` (1.0 at inference)."""
    return append_score(persobench_messages(dialogue, "vanilla", word_limit, system), score)


def completion_text(response: str, response_format: Literal["json", "text"]) -> str:
    if response_format == "json":
        return json.dumps({"response": response}, ensure_ascii=False)
    return response


@dataclass
class _Augmentation:
    slot: Slot
    fill: str
    text: str
    raw_score: float | None = None


@contextlib.contextmanager
def _progress(console: Any) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """``task(label, total)`` returns an ``advance(n)``; nothing is shown without a console."""
    if console is None:
        yield lambda label, total: lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console,
    ) as bar:  # fmt: skip

        def task(label: str, total: int) -> Callable[[int], None]:
            handle = bar.add_task(label, total=total)
            return lambda n: bar.advance(handle, n)

        yield task


def _pick(
    proposals: Sequence[str], noun: str, how: str, rng: random.Random
) -> tuple[str | None, int]:
    """(the fill, how many proposals equal to the noun were skipped on the way)."""
    skipped = 0
    usable = []
    for word in proposals:
        if word.lower() == noun.lower():
            skipped += 1
            continue
        usable.append(word)
        if how == "first":
            break
    if not usable:
        return None, skipped
    return (usable[0] if how == "first" else rng.choice(usable)), skipped


def _example(
    dialogue: Dialogue, text: str, score: float, meta: dict[str, Any], config: SBSConfig
) -> SFTExample:
    return SFTExample(
        dialogue_id=dialogue.id,
        prompt=sbs_messages(dialogue, score, config.word_limit, config.system),
        completion=[
            Message(role="assistant", content=completion_text(text, config.response_format))
        ],
        task=TASK,
        meta={"score": score, **meta},
    )


def build_sbs_dataset(
    dialogues: Sequence[Dialogue],
    config: SBSConfig,
    *,
    filler: Filler | None = None,
    scorer: Scorer | None = None,
    console: Any = None,
) -> tuple[list[SFTExample], dict[str, Any]]:
    """SBS's SFT examples for every dialogue with a gold reply, and a summary of what was done.

    ``filler`` and ``scorer`` default to the ones named in ``config``. Deterministic for a
    given config: the random draws of each dialogue come from ``seed`` and its id only.
    """
    filler = filler or make_filler(config.filler, **config.filler_options)
    scorer = scorer or MetricScorer(config.scorer, **config.scorer_options)
    usable = [d for d in dialogues if (d.reference or "").strip()]
    originals = [d.reference.strip() for d in usable if d.reference]
    nlp = load_spacy(config.spacy_model)
    counts = dict.fromkeys(
        ("nouns_found", "nouns_masked", "skipped_equal_fills", "nouns_without_fill", "unscored",
         "scores_capped"), 0
    )  # fmt: skip
    with _progress(console) as task:
        advance = task("tagging", len(originals))
        slot_lists = find_slots(nlp, originals)
        advance(len(originals))
        vocab: list[tuple[str, str]] = []
        if filler.needs_vocabulary:
            personas = list(dict.fromkeys(s for d in dialogues for s in d.persona))
            vocab = vocabulary([*slot_lists, *find_slots(nlp, personas)])
        filler.load(vocab)

        rngs = [random.Random(f"{config.seed}:{d.id}") for d in usable]
        chosen: list[list[Slot]] = []
        for slots, rng in zip(slot_lists, rngs, strict=True):
            counts["nouns_found"] += len(slots)
            limit = config.max_augmentations
            if limit is not None and len(slots) > limit:
                picked = sorted(rng.sample(range(len(slots)), limit))
                slots = [slots[i] for i in picked]
            counts["nouns_masked"] += len(slots)
            chosen.append(slots)
        if any(chosen):  # before the long filling pass: a scorer that cannot load fails now
            scorer.load(usable)

        flat = [slot for slots in chosen for slot in slots]
        advance = task("filling", len(flat))
        proposals: list[list[str]] = []
        for begin in range(0, len(flat), FILL_CHUNK):
            chunk = flat[begin : begin + FILL_CHUNK]
            proposals += filler.fill(chunk)
            advance(len(chunk))

        augmented: list[list[_Augmentation]] = []
        cursor = 0
        for slots, rng in zip(chosen, rngs, strict=True):
            made = []
            for slot in slots:
                fill, skipped = _pick(proposals[cursor], slot.noun, config.pick, rng)
                cursor += 1
                counts["skipped_equal_fills"] += skipped
                if fill is None:
                    counts["nouns_without_fill"] += 1
                else:
                    made.append(_Augmentation(slot, fill, slot.replaced(fill)))
            augmented.append(made)

        todo = [(d, a) for d, made in zip(usable, augmented, strict=True) for a in made]
        advance = task("scoring", len(todo))
        for begin in range(0, len(todo), SCORE_CHUNK):
            chunk = todo[begin : begin + SCORE_CHUNK]
            values = scorer.score([(d, a.text) for d, a in chunk])
            for (_, aug), value in zip(chunk, values, strict=True):
                aug.raw_score = value
            advance(len(chunk))

    examples: list[SFTExample] = []
    scores: list[float] = []
    for dialogue, original, made in zip(usable, originals, augmented, strict=True):
        if config.include_originals:
            examples.append(_example(dialogue, original, 1.0, {"kind": "original"}, config))
        for aug in made:
            if aug.raw_score is None or not math.isfinite(aug.raw_score):
                counts["unscored"] += 1
                continue
            score = round(aug.raw_score, 2) + 0.0
            if score > config.max_augmented_score:
                score = config.max_augmented_score
                counts["scores_capped"] += 1
            scores.append(score)
            meta = {
                "kind": "augmented",
                "noun": aug.slot.noun,
                "fill": aug.fill,
                "start": aug.slot.start,
                "raw_score": aug.raw_score,
            }
            examples.append(_example(dialogue, aug.text, score, meta, config))

    summary: dict[str, Any] = {
        "dialogues": len(dialogues),
        "dialogues_without_reference": len(dialogues) - len(usable),
        "responses": len(usable),
        "responses_without_nouns": sum(1 for slots in slot_lists if not slots),
        **counts,
        "augmentations": len(scores),
        "originals": len(usable) if config.include_originals else 0,
        "examples": len(examples),
        "score_mean": round(sum(scores) / len(scores), 4) if scores else None,
        "score_min": min(scores, default=None),
        "score_max": max(scores, default=None),
        "filler": filler.settings(),
        "scorer": scorer.settings(),
        "seed": config.seed,
    }
    return examples, summary
