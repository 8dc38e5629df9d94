"""The ``reference`` responder: the dataset's own gold reply, as a system among the others.

It gives benchmarks an upper line to read other systems against, and PersoDPO-style pairing a
strong "chosen" reply when few models answer. ``format: json`` wraps the reply the way the
PersoBench prompt asks for (``{"response": ...}``); ``format: text`` leaves it bare, which
extraction counts as a failure — a reply with the right words in the wrong format.
"""

from __future__ import annotations

import json
from typing import Any

from persona_align.errors import InputError
from persona_align.generation.base import (
    GenerationParams,
    OnResult,
    Request,
    Responder,
    Result,
    register_responder,
)


@register_responder("reference")
class ReferenceResponder(Responder):
    kind = "reference"
    cacheable = False

    def __init__(self, name: str | None = None, format: str = "json") -> None:
        if format not in ("json", "text"):
            raise InputError(None, f"reference format must be json or text, got {format!r}")
        super().__init__(name or f"reference-{format}")
        self.format = format

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "format": self.format}

    def generate(
        self, requests: list[Request], params: GenerationParams, on_result: OnResult
    ) -> None:
        for request in requests:
            gold = request.dialogue.reference
            if gold is None:
                on_result(request, Result(error="NoReference"))
                continue
            raw = (
                json.dumps({"response": gold}, ensure_ascii=False)
                if self.format == "json"
                else gold
            )
            on_result(request, Result(raw=raw, latency_s=0.0))
