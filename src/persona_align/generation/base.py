"""What every responder implements, and the registry that finds responders by name."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

from pydantic import TypeAdapter, ValidationError

from persona_align.errors import InputError
from persona_align.prompting import ExtractionMode, Variant
from persona_align.records import Dialogue, Message


@dataclass(frozen=True)
class GenerationParams:
    """Decoding and prompting settings; all of them are part of the cache key."""

    max_new_tokens: int = 110
    temperature: float = 0.0  # 0 = greedy, as PersoBench
    top_p: float = 1.0
    seed: int = 0
    variant: Variant = "vanilla"
    word_limit: int = 110
    system: str | None = None
    extraction: ExtractionMode = "lenient"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Request:
    """One prompt to answer; ``key`` is its cache key (responder settings + prompt + params)."""

    dialogue: Dialogue
    messages: list[Message]
    prompt_hash: str
    key: str = ""


@dataclass
class Result:
    """What came back: the raw text, or an error class name when the call finally failed."""

    raw: str = ""
    latency_s: float | None = None
    error: str | None = None
    usage: dict[str, int] = field(default_factory=dict)


OnResult = Callable[[Request, Result], None]


class Responder(ABC):
    """A source of replies. ``generate`` answers every request and reports each as it finishes.

    ``settings()`` returns everything that changes the output (model, dtype, server, ...) but no
    secret: it goes into the cache key and into run manifests.
    """

    kind: ClassVar[str]
    # Whether answers go to the generation cache. Responders that read their replies from files
    # say no: their errors (no reply in the file) are not calls a rerun could retry.
    cacheable: ClassVar[bool] = True

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def settings(self) -> dict[str, Any]: ...

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Fail fast, before any work: load the model, check the key and the server."""

    @abstractmethod
    def generate(
        self, requests: list[Request], params: GenerationParams, on_result: OnResult
    ) -> None: ...


ResponderFactory = Callable[..., Responder]
RESPONDERS: dict[str, ResponderFactory] = {}


def register_responder(kind: str) -> Callable[[ResponderFactory], ResponderFactory]:
    def wrap(factory: ResponderFactory) -> ResponderFactory:
        if kind in RESPONDERS:
            raise ValueError(f"responder {kind!r} registered twice")
        RESPONDERS[kind] = factory
        return factory

    return wrap


def make_responder(kind: str, **options: Any) -> Responder:
    """Build a responder from config: ``kind`` names the registry entry.

    The options are checked against the factory's signature and type hints first (a YAML
    ``timeout: soon`` is bad input naming its key, not a TypeError deep inside), so that any
    TypeError the factory raises stays a bug.
    """
    factory = RESPONDERS.get(kind)
    if factory is None:
        raise InputError(
            None, f"unknown responder {kind!r}; known: {', '.join(sorted(RESPONDERS))}"
        )
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as err:
        raise InputError(None, f"responder {kind!r}: {err}") from None
    hints = get_type_hints(factory.__init__ if isinstance(factory, type) else factory)
    for name, value in options.items():
        try:
            options[name] = TypeAdapter(hints.get(name, Any)).validate_python(value)
        except ValidationError as err:
            message = err.errors()[0]["msg"]
            raise InputError(
                None, f"responder {kind!r}: {message}, got {value!r}", field=name
            ) from None
    return factory(**options)


def make_responders(
    entries: Sequence[tuple[str, dict[str, Any]]], source: Path | None, key: str | None
) -> list[Responder]:
    """Build each (kind, options) entry of a config's responder list; a bad one is reported
    with the file and its key (``generate.responders.1.timeout``)."""
    made = []
    for index, (kind, options) in enumerate(entries):
        try:
            made.append(make_responder(kind, **options))
        except InputError as err:
            field = ".".join(p for p in (f"{key}.{index}" if key else None, err.field) if p)
            raise InputError(source or err.path, err.message, field=field) from None
    return made
