"""The ``import`` responder: replies that already exist in a file, attached like generated ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persona_align.data.responses import import_responses
from persona_align.errors import InputError
from persona_align.files import require_file
from persona_align.generation.base import (
    GenerationParams,
    OnResult,
    Request,
    Responder,
    Result,
    register_responder,
)


@register_responder("import")
class ImportResponder(Responder):
    """Reads a responses CSV (row-aligned with the dialogues) or JSONL keyed by dialogue id.

    ``extraction: none`` is for files that already hold extracted replies (PersoBench's
    ``Responses/`` folders), where an empty cell is a failure.
    """

    kind = "import"
    cacheable = False

    def __init__(
        self,
        path: str,
        name: str | None = None,
        extraction: str | None = None,
        subset: bool = False,
    ) -> None:
        super().__init__(name or Path(path).stem)
        if extraction not in (None, "lenient", "strict", "none"):
            raise InputError(
                None, f"import extraction must be lenient, strict or none, got {extraction!r}"
            )
        self.path = Path(path)
        self.extraction = extraction
        self.subset = subset  # the run's dialogues are a part of what the file answers

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path)}

    def prepare(self) -> None:
        require_file(self.path)

    def generate(
        self, requests: list[Request], params: GenerationParams, on_result: OnResult
    ) -> None:
        dialogues = [r.dialogue for r in requests]
        candidates = import_responses(self.path, dialogues, self.name, "none", subset=self.subset)
        for request, candidate in zip(requests, candidates, strict=True):
            on_result(
                request,
                Result(raw=candidate.raw, latency_s=candidate.latency_s, error=candidate.error),
            )
