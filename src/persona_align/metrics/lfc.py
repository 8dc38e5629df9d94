"""Length-format compliance (PersoDPO): closeness to a target length plus a JSON format bonus.

LFC = max(0, 1 - ((words - target) / target)^2) + bonus · [raw output is exactly a
``{"response": ...}`` JSON object]. PersoDPO defines LFC = w1·s_length + w2·s_format with
w1 > w2 (length weighs more than format); the authors' code used w1 = 1, w2 = 0.3, the default
here. The target (the authors' ``avg``) is the mean word count of the gold replies of the
dialogues scored, unless ``target`` is given. The bonus is decided on the raw output, not the
extracted reply: PersoDPO's released code tested the extracted text, so its bonus never fired.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean

from persona_align.errors import InputError
from persona_align.metrics.base import Metric, ScoreItem, Unavailable, register_metric
from persona_align.prompting import extract_strict
from persona_align.records import Dialogue


def length_score(words: int, target: float) -> float:
    return max(0.0, 1.0 - ((words - target) / target) ** 2)


@register_metric("lfc")
class LFC(Metric):
    description = "length-format compliance: length near the target (weight 1) + strict-JSON bonus"
    failure_value = 0.0

    def __init__(self, target: float | None = None, format_bonus: float = 0.3) -> None:
        super().__init__()
        if target is not None and target <= 0:
            raise InputError(None, f"metric 'lfc': target must be positive, got {target}")
        self.target = target
        self.format_bonus = format_bonus

    def settings(self) -> dict[str, object]:
        return {"name": self.name, "target": self.target, "format_bonus": self.format_bonus}

    def fit(self, dialogues: Sequence[Dialogue]) -> None:
        """Without an explicit target, aim at the mean length of the gold replies."""
        if self.target is None:
            lengths = [len(d.reference.split()) for d in dialogues if d.reference]
            if not lengths:
                raise Unavailable("no target length: set target or score dialogues with references")
            self.target = fmean(lengths)

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        if self.target is None:
            raise Unavailable("fit() was not called and no target was set")
        return [
            length_score(len(item.response.split()), self.target)
            + (self.format_bonus if extract_strict(item.candidate.raw) is not None else 0.0)
            for item in items
        ]
