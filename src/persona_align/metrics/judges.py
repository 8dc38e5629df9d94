"""How our judges see an item, and how their agreement with readers' labels is measured.

The C judge is a cross-encoder over (role-tagged persona + the turn being answered, reply);
the coherence judge reads sentence embeddings (``metrics/coherence_judge.py``). Training
(``training/judge.py``) and scoring use these same functions, so a judge always sees inputs
formatted as it was trained on. A judge folder's ``judge.json`` records its task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from persona_align.data.persobench import parse_context
from persona_align.data.text import split_sentences
from persona_align.errors import InputError
from persona_align.records import JudgeInput, JudgeItem, Turn

# Whose persona it is, said in words the encoder can read (the role changes what "uses the
# persona" looks like: "since you love history" vs "I love history").
ROLE_TAGS = {"user": "persona of the person addressed:", "self": "persona of the speaker:"}
C_LABELS = ("entailment", "neutral", "contradiction")  # uses / neutral / contradicts
C_VALUES = {"entailment": 1, "neutral": 0, "contradiction": -1}
LAST_TURN_WORDS = 40  # of the turn being answered, given to the C judge


def persona_sentences(persona: str | Sequence[str]) -> list[str]:
    """Sentences of a persona given as the datasets glue them ("I like X.I am Y.") or a list."""
    if isinstance(persona, str):
        return split_sentences(persona)
    return [sentence.strip() for sentence in persona if sentence.strip()]


def _last_words(text: str, limit: int) -> str:
    words = text.split()
    return " ".join(words[-limit:])


def c_pair(
    persona: str | Sequence[str], role: str, context: Sequence[Turn], reply: str
) -> tuple[str, str]:
    """(role-tagged persona + the turn being answered, reply) for the C judge."""
    head = f"{ROLE_TAGS[role]} {' '.join(persona_sentences(persona))}"
    if context:
        head += f" | they said: {_last_words(context[-1].text, LAST_TURN_WORDS)}"
    return head, reply


def read_judge_items(path: str | Path) -> list[JudgeItem]:
    """A labelled judge file (the dev set's format); bad lines raise InputError with line and
    field."""
    from persona_align.records import read_jsonl

    items = read_jsonl(path, JudgeItem)
    if not items:
        raise InputError(path, "holds no labelled items")
    return items


def item_context(item: JudgeInput) -> list[Turn]:
    return parse_context(item.context) if item.context.strip() else []


def c_item_pair(item: JudgeInput) -> tuple[str, str]:
    """The text pair the C judge sees for a labelled item."""
    return c_pair(item.persona, item.persona_role, item_context(item), item.reply)


def c_label_index(label: int) -> int:
    """A gold C label (-1/0/1) as the judge's output index."""
    return C_LABELS.index({1: "entailment", 0: "neutral", -1: "contradiction"}[label])


@dataclass(frozen=True)
class JudgeEvaluation:
    """Agreement of a judge with reader labels (values, not output indices: 1/0/-1)."""

    items: int
    accuracy: float
    kappa: float
    values: list[int]  # the label values, in confusion-matrix order
    confusion: list[list[int]]  # rows = gold, columns = judge
    false_contradictions: float | None  # share of gold-not--1 items the judge calls -1
    unjudged: int = 0  # items the judge could not label (an LLM call that kept failing)

    def per_class(self) -> dict[str, dict[str, float | None]]:
        found = {}
        for i, value in enumerate(self.values):
            column = sum(row[i] for row in self.confusion)
            row = sum(self.confusion[i])
            found[str(value)] = {
                "precision": self.confusion[i][i] / column if column else None,
                "recall": self.confusion[i][i] / row if row else None,
                "gold": row,
                "predicted": column,
            }
        return found

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "accuracy": self.accuracy,
            "kappa": self.kappa,
            "per_class": self.per_class(),
            "confusion": {"labels": self.values, "gold_by_predicted": self.confusion},
            "false_contradictions": self.false_contradictions,
            "unjudged": self.unjudged,
        }


def cohen_kappa(gold: Sequence[int], other: Sequence[int]) -> float:
    """Cohen's kappa of two labellings of the same items."""
    n = len(gold)
    if n == 0:
        return float("nan")
    observed = sum(a == b for a, b in zip(gold, other, strict=True)) / n
    values = set(gold) | set(other)
    expected = sum((gold.count(v) / n) * (list(other).count(v) / n) for v in values)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def agreement(
    gold: Sequence[int], predicted: Sequence[int], values: Sequence[int]
) -> JudgeEvaluation:
    """Accuracy, kappa, confusion matrix and false-contradiction share of two labellings."""
    confusion = [[0] * len(values) for _ in values]
    for g, p in zip(gold, predicted, strict=True):
        confusion[values.index(g)][values.index(p)] += 1
    n = len(gold)
    not_contradiction = [p for g, p in zip(gold, predicted, strict=True) if g != -1]
    false = (
        sum(p == -1 for p in not_contradiction) / len(not_contradiction)
        if -1 in values and not_contradiction
        else None
    )
    accuracy = sum(g == p for g, p in zip(gold, predicted, strict=True)) / n if n else 0.0
    return JudgeEvaluation(
        n, accuracy, cohen_kappa(gold, predicted), list(values), confusion, false
    )


def evaluate_judge(task: str, judge: Any, items: Sequence[JudgeItem]) -> JudgeEvaluation:
    """Label ``items`` with ``judge`` (a C PairClassifier, a CoherenceJudge, or anything with
    ``label_values(items)``) and compare with their labels; None labels are left out."""
    if hasattr(judge, "label_values"):
        predicted = judge.label_values(items)
    elif task == "c":
        probs = judge.probabilities([c_item_pair(i) for i in items])
        predicted = [c_value(row, judge.spec) for row in probs]
    else:
        from persona_align.metrics.coherence_judge import coherence_input

        inputs = [coherence_input(item_context(i) or [Turn(speaker="User1", text="-")], i.reply,
                                  persona_sentences(i.persona)) for i in items]  # fmt: skip
        predicted = [int(p >= 0.5) for p in judge.probabilities(inputs)]
    values = [1, 0, -1] if task == "c" else [1, 0]
    judged = [(i.label, p) for i, p in zip(items, predicted, strict=True) if p is not None]
    found = agreement([g for g, _ in judged], [p for _, p in judged], values)
    return replace(found, unjudged=len(items) - len(judged))


def c_value(row: Any, spec: dict[str, Any]) -> int:
    """1/0/-1 from the C judge's (entailment, neutral, contradiction) probabilities.

    A contradiction is called only when its probability reaches the judge's calibrated
    ``contradiction_threshold`` (default: the argmax rule): calling an ordinary reply a
    contradiction is the costliest error, since -1 is also what a failed reply scores.
    """
    threshold = spec.get("contradiction_threshold")
    if threshold is not None and row[2] >= threshold:
        return -1
    ranked = sorted(range(3), key=lambda i: -row[i])
    best = ranked[0] if threshold is None or ranked[0] != 2 else ranked[1]
    return C_VALUES[C_LABELS[best]]
