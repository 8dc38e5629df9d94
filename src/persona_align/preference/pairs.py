"""Pairing rules: which candidates of one dialogue become (chosen, rejected) DPO pairs.

Rules live in a registry; each sees one dialogue's candidates with their total scores. The
output is TRL's conversational preference format plus the scores and a per-pair weight
(PersoDPO: sigmoid(score_chosen - score_rejected)).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from persona_align.errors import InputError
from persona_align.prompting import persobench_messages
from persona_align.records import Dialogue, Message, PreferencePair, ScoredCandidate

# json: valid replies re-written as {"response": ...}; text: bare reply; raw: as the model wrote
# it. auto = raw for the format rule (its pairs then differ in validity only, not in how the
# JSON is laid out), json otherwise (PersoDPO).
PairFormat = Literal["auto", "json", "text", "raw"]
PairWeight = Literal["sigmoid", "one"]
Pairs = list[tuple[ScoredCandidate, ScoredCandidate]]


@dataclass(frozen=True)
class PairingConfig:
    rule: str = "quantile"
    upper: float = 0.6  # quantile rule: chosen ≥ this quantile of the dialogue's totals
    lower: float = 0.4  # ... rejected ≤ this one
    margin: float = 0.1  # margin rule: minimum gap of totals
    max_pairs_per_dialogue: int | None = None
    dedupe: bool = True
    seed: int = 0
    weight: PairWeight = "sigmoid"
    response_format: PairFormat = "auto"
    variant: Literal["vanilla", "cot"] = "vanilla"
    word_limit: int = 110
    system: str | None = None

    def check(self) -> None:
        if self.rule not in RULES:
            raise InputError(None, f"unknown pairing rule {self.rule!r}; known: {', '.join(RULES)}")
        if not 0 <= self.lower <= self.upper <= 1:
            raise InputError(None, f"need 0 ≤ lower ≤ upper ≤ 1, got {self.lower} and {self.upper}")
        if self.margin < 0:
            raise InputError(None, f"margin must not be negative, got {self.margin}")
        if self.max_pairs_per_dialogue is not None and self.max_pairs_per_dialogue < 1:
            raise InputError(None, "max pairs per dialogue must be at least 1")


def _total(c: ScoredCandidate) -> float:
    assert c.total is not None  # build_pairs checks this for every score-based rule
    return c.total


def quantile_rule(group: Sequence[ScoredCandidate], config: PairingConfig) -> Pairs:
    """PersoDPO: every reply ≥ the upper quantile paired with every reply ≤ the lower one."""
    totals = np.array([_total(c) for c in group])
    high, low = np.quantile(totals, config.upper), np.quantile(totals, config.lower)
    chosen = [c for c in group if c.valid and _total(c) >= high]
    rejected = [c for c in group if _total(c) <= low]
    return [(a, b) for a in chosen for b in rejected if _total(a) > _total(b)]


def margin_rule(group: Sequence[ScoredCandidate], config: PairingConfig) -> Pairs:
    return [
        (a, b) for a in group for b in group if a.valid and _total(a) - _total(b) >= config.margin
    ]


def best_worst_rule(group: Sequence[ScoredCandidate], config: PairingConfig) -> Pairs:
    valid = [c for c in group if c.valid]
    if not valid:
        return []
    best, worst = max(valid, key=_total), min(group, key=_total)
    return [(best, worst)] if _total(best) > _total(worst) else []


def format_rule(group: Sequence[ScoredCandidate], config: PairingConfig) -> Pairs:
    """The vanilla DPO baseline: a valid JSON reply over an invalid one, scores aside."""
    return [(a, b) for a in group if a.valid for b in group if not b.valid]


RULES: dict[str, Callable[[Sequence[ScoredCandidate], PairingConfig], Pairs]] = {
    "quantile": quantile_rule,
    "margin": margin_rule,
    "best-worst": best_worst_rule,
    "format": format_rule,
}


def _content(candidate: ScoredCandidate, response_format: str) -> str:
    """A valid reply in the requested format; an invalid one as the model actually wrote it."""
    if candidate.response is None or response_format == "raw":
        return candidate.raw
    if response_format == "json":
        return json.dumps({"response": candidate.response}, ensure_ascii=False)
    return candidate.response


def build_pairs(
    dialogues: dict[str, Dialogue], scored: Iterable[ScoredCandidate], config: PairingConfig
) -> list[PreferencePair]:
    """Pairs for every dialogue, in dialogue order; deterministic for a given seed. Candidates
    with a call error (no reply came back) are neither chosen nor rejected."""
    config.check()
    groups: dict[str, list[ScoredCandidate]] = {}
    for index, candidate in enumerate(scored, start=1):
        if candidate.dialogue_id not in dialogues:
            raise InputError(
                None, f"scored record {index} answers unknown dialogue {candidate.dialogue_id!r}"
            )
        if candidate.error is not None:
            continue
        if candidate.total is None and config.rule != "format":
            raise InputError(
                None,
                f"scored record {index} has no total score; the {config.rule!r} rule needs one",
            )
        groups.setdefault(candidate.dialogue_id, []).append(candidate)
    rule = RULES[config.rule]
    response_format = config.response_format
    if response_format == "auto":
        response_format = "raw" if config.rule == "format" else "json"
    out: list[PreferencePair] = []
    for dialogue_id, group in groups.items():
        pairs = rule(group, config)
        prompt = persobench_messages(
            dialogues[dialogue_id], config.variant, config.word_limit, config.system
        )
        seen: set[tuple[str, str]] = set()
        made: list[PreferencePair] = []
        for chosen, rejected in pairs:
            texts = (
                _content(chosen, response_format),
                _content(rejected, response_format),
            )
            if config.dedupe and (texts[0] == texts[1] or texts in seen):
                continue
            seen.add(texts)
            if config.rule == "format":  # vanilla DPO: validity is the only preference
                s_chosen, s_rejected, weight = 1.0, 0.0, 1.0
            else:
                s_chosen, s_rejected = _total(chosen), _total(rejected)
                weight = (
                    1.0 / (1.0 + math.exp(s_rejected - s_chosen))
                    if config.weight == "sigmoid"
                    else 1.0
                )
            made.append(
                PreferencePair(
                    dialogue_id=dialogue_id,
                    prompt=prompt,
                    chosen=[Message(role="assistant", content=texts[0])],
                    rejected=[Message(role="assistant", content=texts[1])],
                    score_chosen=s_chosen,
                    score_rejected=s_rejected,
                    weight=weight,
                    rule=config.rule,
                )
            )
        if config.max_pairs_per_dialogue is not None and len(made) > config.max_pairs_per_dialogue:
            made = random.Random(f"{config.seed}:{dialogue_id}").sample(
                made, config.max_pairs_per_dialogue
            )
        out += made
    return out
