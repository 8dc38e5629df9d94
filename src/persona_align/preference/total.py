"""PersoDPO's total score: a weighted sum of metric values after min-max scaling on the pool."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from persona_align.errors import InputError
from persona_align.records import ScoredCandidate

# PersoDPO: 0.14 Coh + 0.20 C + 0.18 UE + 0.16 P + 0.32 LFC (our offline coherence judge
# stands in for Coh-UniEval by default; name `coh-unieval` in the weights to use UniEval).
DEFAULT_WEIGHTS: dict[str, float] = {
    "coh": 0.14,
    "c": 0.20,
    "ue": 0.18,
    "p": 0.16,
    "lfc": 0.32,
}


@dataclass(frozen=True)
class MinMax:
    low: float
    high: float

    def scale(self, value: float) -> float:
        return 0.0 if self.high == self.low else (value - self.low) / (self.high - self.low)


def fit_minmax(scored: Iterable[ScoredCandidate], metrics: Iterable[str]) -> dict[str, MinMax]:
    """Range of every weighted metric over the pool (failures included, at their worst value)."""
    names = list(metrics)
    values: dict[str, list[float]] = {name: [] for name in names}
    for candidate in scored:
        for name in names:
            value = candidate.scores.get(name)
            if value is not None:
                values[name].append(value)
    missing = [name for name, found in values.items() if not found]
    if missing:
        raise InputError(
            None,
            f"metric {missing[0]!r} has a weight but no value in the scored file "
            "(not scored, or unavailable): score it or drop its weight, "
            "e.g. --weights c=0.20,ue=0.18,p=0.16,lfc=0.32",
        )
    return {name: MinMax(min(found), max(found)) for name, found in values.items()}


def total_score(
    scores: Mapping[str, float | None], weights: Mapping[str, float], ranges: Mapping[str, MinMax]
) -> float:
    """Σ weight · min-max-scaled value; a missing value counts as the pool minimum."""
    return sum(
        weight * (ranges[name].scale(value) if (value := scores.get(name)) is not None else 0.0)
        for name, weight in weights.items()
    )
