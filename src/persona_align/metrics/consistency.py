"""C and UE: does the reply agree with the persona?

- ``c`` (persona consistency): +1 when the reply uses the persona consistently, 0 when it is
  neutral, -1 when it contradicts it; a failure scores -1. The default judge,
  ``embedded-c-judge``, is a cross-encoder trained on replies labelled by careful reading
  (both persona roles: the listener's, as in FoCus, and the speaker's own, as in PERSONA-CHAT),
  checked against the readers' dev labels (``persona-align judge eval``). It reads the role-
  tagged persona, the turn being answered and the reply. ``judge=openai:MODEL@URL`` asks a chat
  model with the labelling guidelines instead.
- The PersoBench protocol stays reproducible: ``model=`` any 3-way NLI model (``embedded-nli``,
  a DNLI-tuned checkpoint) scores NLI(premise = persona, hypothesis = reply), entailment → +1,
  neutral → 0, contradiction → -1; ``mode=persobench`` feeds the whole persona text as one
  premise (PersoBench), ``max`` and ``mean`` score each persona sentence and take the max (PAL)
  or the mean (Madotto et al.).
- ``ue`` (utterance entailment, PersoBench): 2 when the reply uses the persona (the C judge's
  +1, or NLI entailment under an NLI ``persona_model``) and is entailed by the gold reply
  (NLI, ``model``), 1 when only the persona gate passes, else 0. A failure scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean
from typing import Any

from persona_align import devices
from persona_align.errors import InputError
from persona_align.metrics.base import Metric, ScoreItem, register_metric
from persona_align.metrics.judges import c_pair, c_value
from persona_align.metrics.nli import EMBEDDED_NLI, NLIModel, Pair, shared_nli
from persona_align.records import Dialogue

EMBEDDED_C_JUDGE = "embedded-c-judge"
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


def _model(metric: str, option: str, name: Any, dtype: str, batch_size: int) -> NLIModel:
    if not isinstance(name, str) or not name.strip():
        raise InputError(None, f"metric {metric!r}: {option} must be a name, got {name!r}")
    try:
        return shared_nli(name, dtype=dtype, batch_size=batch_size)
    except InputError as err:
        raise InputError(None, f"metric {metric!r}: {err}") from None


class PersonaGate:
    """Per-reply persona values (+1/0/-1) from the C judge or, for an NLI model, PersoBench's
    NLI(persona, reply) in one of the C modes. Shared by ``c`` and UE's persona gate."""

    def __init__(self, model: NLIModel, mode: str | None) -> None:
        self.model = model
        self.mode = mode

    @property
    def is_judge(self) -> bool:
        return self.model.spec.get("task") == "c"

    def check(self, metric: str) -> None:
        """After loading: a mode is for NLI models only; a judge of another task is refused."""
        task = self.model.spec.get("task")
        if task not in (None, "c"):
            raise InputError(None, f"metric {metric!r}: {self.model.name!r} is a {task} judge")
        if self.is_judge and self.mode is not None:
            raise InputError(
                None, f"metric {metric!r}: mode applies to NLI models, not to the C judge"
            )

    def values(self, items: Sequence[ScoreItem]) -> list[float]:
        if self.is_judge:
            pairs = [
                c_pair(i.dialogue.persona, i.dialogue.persona_role, i.dialogue.context, i.response)
                for i in items
            ]
            return [float(c_value(r, self.model.spec)) for r in self.model.probabilities(pairs)]
        mode = self.mode or "persobench"
        if mode == "persobench":
            labels = self.model.predict([(persona_text(i.dialogue), i.response) for i in items])
            return [C_VALUE[label] for label in labels]
        sentence_pairs: list[Pair] = [(p, i.response) for i in items for p in i.dialogue.persona]
        found = iter([C_VALUE[label] for label in self.model.predict(sentence_pairs)])
        reduce = max if mode == "max" else fmean
        return [reduce([next(found) for _ in i.dialogue.persona]) for i in items]

    def settings(self) -> dict[str, Any]:
        return {
            "model": self.model.name,
            "version": self.model.version,
            "dtype": devices.dtype_for(self.model.dtype),
            "mode": self.mode,
            "spec": self.model.spec,
        }


@register_metric("c")
class CScore(Metric):
    description = "persona consistency: uses the persona +1 / neutral 0 / contradicts it -1"
    failure_value = -1.0

    def __init__(
        self,
        model: str = EMBEDDED_C_JUDGE,
        mode: str | None = None,
        judge: str | None = None,
        dtype: str = "auto",
        batch_size: int = 64,
        **llm_options: Any,
    ) -> None:
        super().__init__()
        if mode is not None and mode not in C_MODES:
            raise InputError(
                None, f"metric 'c': mode must be one of {', '.join(C_MODES)}, got {mode!r}"
            )
        self.llm: Any = None
        if judge is not None:
            from persona_align.metrics.llm_judge import LLMJudge

            self.llm = LLMJudge.from_spec(judge, "c", **llm_options)
        elif llm_options:
            raise InputError(None, f"metric 'c' has no option {sorted(llm_options)[0]!r}")
        self.gate = PersonaGate(_model("c", "model", model, dtype, batch_size), mode)

    @property
    def model(self) -> str:
        return self.llm.name if self.llm is not None else self.gate.model.name

    def settings(self) -> dict[str, Any]:
        if self.llm is not None:
            return {"name": self.name} | self.llm.settings()
        return {"name": self.name} | self.gate.settings()

    def load(self) -> None:
        if self.llm is not None:
            self.llm.load()
            return
        self.gate.model.load()
        self.gate.check(self.name)

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        if self.llm is not None:
            return self.llm.c_values(items)
        return list(self.gate.values(items))


@register_metric("ue")
class UEScore(Metric):
    description = "utterance entailment: 2 if it uses the persona and is entailed by the gold reply"
    failure_value = 0.0
    needs_reference = True

    def __init__(
        self,
        model: str = EMBEDDED_NLI,
        persona_model: str = EMBEDDED_C_JUDGE,
        dtype: str = "auto",
        batch_size: int = 64,
    ) -> None:
        super().__init__()
        self.nli = _model("ue", "model", model, dtype, batch_size)
        self.gate = PersonaGate(
            _model("ue", "persona_model", persona_model, dtype, batch_size), None
        )

    @property
    def model(self) -> str:
        return f"{self.gate.model.name} + {self.nli.name}"

    def settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.nli.name,
            "version": self.nli.version,
            "dtype": devices.dtype_for(self.nli.dtype),
            "persona": self.gate.settings(),
        }

    def load(self) -> None:
        self.nli.load()
        self.gate.model.load()
        self.gate.check(self.name)

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        """The (gold reply, reply) pair is judged only for replies that pass the persona gate:
        for the others UE is 0 whatever that pair's label."""
        scored = [i for i in items if i.dialogue.reference]
        gate = self.gate.values(scored)
        passed = [i for i, value in zip(scored, gate, strict=True) if value == 1.0]
        by_reference = iter(
            self.nli.predict([(i.dialogue.reference or "", i.response) for i in passed])
            if passed
            else []
        )
        values = iter(
            ue_value("entailment" if value == 1.0 else "neutral",
                     next(by_reference) if value == 1.0 else None)
            for value in gate
        )  # fmt: skip
        return [next(values) if i.dialogue.reference else None for i in items]
