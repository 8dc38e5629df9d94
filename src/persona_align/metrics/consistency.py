"""C and UE: does the reply agree with the persona? Judged by an NLI model.

- ``c`` (consistency, PersoBench/PAL/Madotto et al.): NLI(premise = persona, hypothesis =
  reply) mapped entailment → +1, neutral → 0, contradiction → -1. ``mode=persobench`` feeds the
  whole persona text as one premise (PersoBench); ``max`` and ``mean`` score each persona
  sentence and take the max (PAL) or the mean (Madotto et al.). A failure scores -1.
- ``ue`` (utterance entailment, PersoBench): 2 when the reply is entailed by both the persona
  and the gold reply, 1 when only by the persona, else 0. A failure scores 0.

The default model is ``embedded-nli`` (MiniLM + the shipped LoRA adapter, trained on DNLI and
MNLI/SNLI-hard), so both metrics run offline. The paper-faithful choices are larger: for C an
NLI model fine-tuned on Dialogue NLI (PersoBench's checkpoint is unreleased; e.g.
``roberta-large-mnli`` further tuned on DNLI, saved locally or trained with
``persona-align train nli --base roberta-large-mnli``); for UE an MNLI/SNLI cross-encoder such
as ``cross-encoder/nli-deberta-v3-base``. Any of them is ``--opt c.model=NAME``.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean
from typing import Any, ClassVar

from persona_align.errors import InputError
from persona_align.metrics.base import Metric, ScoreItem, register_metric
from persona_align.metrics.nli import EMBEDDED_NLI, Pair, shared_nli
from persona_align.records import Dialogue

C_VALUE = {"entailment": 1.0, "neutral": 0.0, "contradiction": -1.0}
C_MODES = ("persobench", "max", "mean")


def persona_text(dialogue: Dialogue) -> str:
    """The persona as one premise, the way PersoBench passes it."""
    return " ".join(sentence.strip() for sentence in dialogue.persona)


def ue_value(by_persona: str, by_reference: str | None) -> float:
    """UE from the two NLI labels; the reference label only matters when the persona entails."""
    if by_persona != "entailment":
        return 0.0
    return 2.0 if by_reference == "entailment" else 1.0


class _NLIMetric(Metric):
    """A metric computed from NLI labels; C and UE differ only in the pairs and the mapping."""

    failure_value: ClassVar[float | None]

    def __init__(
        self, model: str = EMBEDDED_NLI, dtype: str = "float32", batch_size: int = 64
    ) -> None:
        super().__init__()
        if not isinstance(model, str) or not model.strip():
            raise InputError(None, f"metric {self.name!r}: model must be a name, got {model!r}")
        try:
            self.nli = shared_nli(model, dtype=dtype, batch_size=batch_size)
        except InputError as err:
            raise InputError(None, f"metric {self.name!r}: {err}") from None

    @property
    def model(self) -> str:
        return self.nli.name

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.nli.name, "dtype": self.nli.dtype}

    def load(self) -> None:
        self.nli.load()


@register_metric("c")
class CScore(_NLIMetric):
    description = "persona consistency: NLI(persona, reply), entail +1 / neutral 0 / contradict -1"
    failure_value = -1.0

    def __init__(self, mode: str = "persobench", **options: Any) -> None:
        if mode not in C_MODES:
            raise InputError(
                None, f"metric 'c': mode must be one of {', '.join(C_MODES)}, got {mode!r}"
            )
        super().__init__(**options)
        self.mode = mode

    def settings(self) -> dict[str, Any]:
        return super().settings() | {"mode": self.mode}

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        if self.mode == "persobench":
            labels = self.nli.predict([(persona_text(i.dialogue), i.response) for i in items])
            return [C_VALUE[label] for label in labels]
        pairs: list[Pair] = [(p, i.response) for i in items for p in i.dialogue.persona]
        values = iter([C_VALUE[label] for label in self.nli.predict(pairs)])
        reduce = max if self.mode == "max" else fmean
        return [reduce([next(values) for _ in i.dialogue.persona]) for i in items]


@register_metric("ue")
class UEScore(_NLIMetric):
    description = "utterance entailment: 2 if entailed by persona and gold reply, 1 by persona only"
    failure_value = 0.0
    needs_reference = True

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        """The (gold reply, reply) pair is judged only for replies the persona entails: for the
        others UE is 0 whatever that pair's label (44% of the valid PersoDPO-pool replies under
        ``embedded-nli``, so that share of the second pass is skipped)."""
        scored = [i for i in items if i.dialogue.reference]
        by_persona = self.nli.predict([(persona_text(i.dialogue), i.response) for i in scored])
        entailed = [i for i, label in zip(scored, by_persona, strict=True) if label == "entailment"]
        by_reference = iter(
            self.nli.predict([(i.dialogue.reference or "", i.response) for i in entailed])
            if entailed
            else []
        )
        values = iter(
            ue_value(label, next(by_reference) if label == "entailment" else None)
            for label in by_persona
        )
        return [next(values) if i.dialogue.reference else None for i in items]
