"""What every metric implements, and the registry that finds metrics by name.

A metric scores a batch of (dialogue, candidate) items and declares the model it needs. When
that model cannot be resolved, ``load`` raises :class:`Unavailable` and the metric is reported
as unavailable with the reason: it never silently scores zero.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from persona_align.errors import InputError
from persona_align.records import Candidate, Dialogue


@dataclass(frozen=True)
class ScoreItem:
    """One reply to score; ``response`` is the extracted reply (never None when scored)."""

    dialogue: Dialogue
    candidate: Candidate

    @property
    def response(self) -> str:
        return self.candidate.response or ""


class Unavailable(Exception):
    """The metric's model (or package) cannot be had here; the message says why."""


class Metric(ABC):
    """Base class: subclasses set ``name`` and implement ``score``.

    ``failure_value`` is what a failed reply (no extractable response) gets, PersoBench's
    "worst value" convention; None leaves failures out (null). ``needs_reference`` metrics
    return None for dialogues without a gold turn.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    failure_value: ClassVar[float | None] = None
    needs_reference: ClassVar[bool] = False
    higher_is_better: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        if options:
            raise InputError(None, f"metric {self.name!r} has no option {sorted(options)[0]!r}")

    @property
    def model(self) -> str | None:
        """The model this metric needs, as named in config (None for model-free metrics)."""
        return None

    def settings(self) -> dict[str, Any]:
        """Everything that changes the values: part of the score cache key."""
        return {"name": self.name, "model": self.model}

    def fit(self, dialogues: Sequence[Dialogue]) -> None:  # noqa: B027 - most metrics need nothing
        """See every dialogue once before scoring (dataset statistics such as a target length)."""

    def load(self) -> None:  # noqa: B027 - model-free metrics need nothing
        """Resolve and load the model; raise Unavailable with the reason when it cannot be."""

    @abstractmethod
    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        """One value per item (items all have a valid response); batch internally."""


MetricFactory = Callable[..., Metric]
METRICS: dict[str, MetricFactory] = {}


def register_metric(name: str) -> Callable[[type[Metric]], type[Metric]]:
    def wrap(cls: type[Metric]) -> type[Metric]:
        if name in METRICS:
            raise ValueError(f"metric {name!r} registered twice")
        cls.name = name
        METRICS[name] = cls
        return cls

    return wrap


def make_metric(name: str, **options: Any) -> Metric:
    factory = METRICS.get(name)
    if factory is None:
        raise InputError(None, f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    try:  # check the options against the signature, so other TypeErrors inside stay bugs
        inspect.signature(factory).bind(**options)
        return factory(**options)
    except TypeError as err:
        if "argument" not in str(err):
            raise
        raise InputError(None, f"metric {name!r}: {err}") from None


def parse_metric_options(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``c.mode=max`` (as given to ``--opt``) into {"c": {"mode": "max"}}; values are read as
    YAML scalars, dashes in option names become underscores."""
    import yaml

    options: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        metric, dot, option = key.partition(".")
        if not sep or not dot or not metric or not option:
            raise InputError(None, f"--opt expects METRIC.OPTION=VALUE, got {pair!r}")
        options.setdefault(metric, {})[option.replace("-", "_")] = yaml.safe_load(value)
    return options
