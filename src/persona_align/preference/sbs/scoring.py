"""Scorers: how similar an augmented response still is to its original (SBS's quality score).

SBS scores every augmented response by BERTScore F1 against the original (their released
code: deberta-xlarge-mnli, baseline-rescaled) and rounds to two decimals; originals score
1.0. A scorer here is any reference-based metric of the metrics registry, the original playing
the gold turn: ``embedding`` (the default, ``sbs-sim``: cosine of all-MiniLM-L6-v2 sentence
embeddings, runs offline) or ``bertscore`` (configurable model and layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from persona_align.errors import InputError
from persona_align.records import Candidate, Dialogue

ALIASES: dict[str, str] = {"embedding": "sbs-sim", "bertscore": "bertscore"}


class Scorer(Protocol):
    """Scores augmented responses against their dialogue's ``reference`` (the original)."""

    def settings(self) -> dict[str, Any]: ...

    def load(self, dialogues: Sequence[Dialogue]) -> None: ...

    def score(self, items: Sequence[tuple[Dialogue, str]]) -> list[float | None]: ...


class MetricScorer:
    """A reference-based metric scoring each augmentation against the gold turn it came from."""

    def __init__(self, name: str = "embedding", **options: Any) -> None:
        from persona_align.metrics import METRICS, make_metric

        metric_name = ALIASES.get(name, name)
        factory = METRICS.get(metric_name)
        if factory is None or not getattr(factory, "needs_reference", False):
            known = sorted({*ALIASES, *(n for n, m in METRICS.items() if m.needs_reference)})
            raise InputError(None, f"unknown SBS scorer {name!r}; known: {', '.join(known)}")
        self.name = name
        self.metric = make_metric(metric_name, **options)

    def settings(self) -> dict[str, Any]:
        return {**self.metric.settings(), "scorer": self.name}

    def load(self, dialogues: Sequence[Dialogue]) -> None:
        """See every original once (BERTScore's idf weights), then load the model."""
        from persona_align.metrics import Unavailable

        try:
            self.metric.fit(dialogues)
            self.metric.load()
        except Unavailable as err:
            raise InputError(None, f"SBS scorer {self.name!r} is unavailable: {err}") from None

    def score(self, items: Sequence[tuple[Dialogue, str]]) -> list[float | None]:
        """``items[i] = (dialogue, augmented)``; the dialogue's reference is the original."""
        from persona_align.metrics import ScoreItem

        return self.metric.score(
            [
                ScoreItem(
                    dialogue,
                    Candidate(
                        dialogue_id=dialogue.id,
                        responder="sbs-augment",
                        raw=augmented,
                        response=augmented,
                        valid=True,
                    ),
                )
                for dialogue, augmented in items
            ]
        )


def format_score(score: float) -> str:
    """``0.87``, ``0.9``, ``1.0``: two decimals at most, as SBS's ``str(round(s, 2))``."""
    return str(round(score, 2) + 0.0)  # + 0.0 turns -0.0 into 0.0
