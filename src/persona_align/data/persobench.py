"""The PersoBench / PersoDPO prompt CSV: ``personas``, ``context``, ``act_response``."""

from __future__ import annotations

import re
from pathlib import Path

from persona_align.data import register_reader
from persona_align.data.text import read_csv_rows, split_sentences
from persona_align.errors import InputError
from persona_align.records import PERSONA_ROLES, Dialogue, Turn

_SPEAKER = re.compile(r"^\s*(User\s?\d+|Persona\s?\d+|Speaker\s?\d+)\s*:\s?", re.IGNORECASE)


def parse_context(text: str) -> list[Turn]:
    """``User1: ...``/``User2: ...`` lines into turns; a line without a prefix continues a turn.

    Text before the first prefix (a bare single query) becomes a ``User1`` turn.
    """
    turns: list[Turn] = []
    speaker, lines = None, []

    def flush() -> None:
        body = "\n".join(lines).strip()
        if body:
            turns.append(Turn(speaker=speaker or "User1", text=body))

    for line in text.replace("\r\n", "\n").split("\n"):
        match = _SPEAKER.match(line)
        if match:
            flush()
            speaker, lines = match.group(1).replace(" ", ""), [line[match.end() :]]
        else:
            lines.append(line)
    flush()
    return turns


def strip_speaker(text: str) -> str:
    return _SPEAKER.sub("", text.strip(), count=1).strip()


@register_reader(
    "persobench-csv",
    "PersoBench/PersoDPO prompt CSV (personas, context, optional act_response)",
    options=("persona_role",),
)
def read_persobench_csv(path: Path, persona_role: str = "user") -> list[Dialogue]:
    """``persona_role``: ``user`` (FoCus: the persona is the listener's, the default) or
    ``self`` (the responder's own persona)."""
    if persona_role not in PERSONA_ROLES:
        raise InputError(
            None,
            f"persona_role {persona_role!r} is not one of {', '.join(PERSONA_ROLES)}",
        )
    dialogues = []
    for index, (where, row) in enumerate(read_csv_rows(path, ("personas", "context"))):
        persona = split_sentences(row["personas"])
        if not persona:
            raise InputError(path, "empty persona", where=where, field="personas")
        context = parse_context(row["context"])
        if not context:
            raise InputError(path, "empty context", where=where, field="context")
        reference = strip_speaker(row.get("act_response") or "") or None
        dialogues.append(
            Dialogue(
                id=f"{path.stem}-{index:05d}",
                persona=persona,
                persona_role=persona_role,
                context=context,
                reference=reference,
                source=f"persobench-csv:{path.name}",
            )
        )
    return dialogues
