"""PERSONA-CHAT / ConvAI2 in ParlAI's text format (original and revised personas).

Each line is ``<n> <text>``; ``n`` restarts at 1 with every episode. ``your persona:`` lines
give the responder's persona (``partner's persona:`` the other speaker's, in the *both*
variants); other lines are ``partner turn<TAB>own reply<TAB><TAB>cand1|cand2|...``.
"""

from __future__ import annotations

import re
from pathlib import Path

from persona_align.data import register_reader
from persona_align.data.text import read_text
from persona_align.errors import InputError
from persona_align.records import Dialogue, Turn

_LINE = re.compile(r"^(\d+) (.*)$")
_SILENCE = "__SILENCE__"


def _flag(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in {"1", "true", "yes"}:
        return True
    if value.lower() in {"0", "false", "no"}:
        return False
    raise InputError(None, f"option keep_candidates expects true or false, got {value!r}")


@register_reader(
    "personachat",
    "PERSONA-CHAT / ConvAI2 ParlAI text (your persona: lines, tab-separated turns)",
    options=("keep_candidates",),
)
def read_personachat(path: Path, keep_candidates: str | bool = False) -> list[Dialogue]:
    keep = _flag(keep_candidates)
    dialogues: list[Dialogue] = []
    episode = -1
    persona: list[str] = []
    partner: list[str] = []
    history: list[Turn] = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        match = _LINE.match(line)
        if not match:
            raise InputError(path, "expected '<number> <text>'", where=where)
        number, text = int(match.group(1)), match.group(2)
        if number == 1:
            episode, persona, partner, history = episode + 1, [], [], []
        if text.startswith("your persona:"):
            persona.append(text.removeprefix("your persona:").strip())
            continue
        if text.startswith("partner's persona:"):
            partner.append(text.removeprefix("partner's persona:").strip())
            continue
        fields = text.split("\t")
        if len(fields) < 2 or not fields[1].strip():
            raise InputError(
                path, "turn line has no reply after the tab", where=where, field="reply"
            )
        said, reply = fields[0].strip(), fields[1].strip()
        if said and said != _SILENCE:
            history.append(Turn(speaker="User1", text=said))
        if not persona:
            raise InputError(
                path,
                "no 'your persona:' line before this turn (the *_none_* files carry no persona)",
                where=where,
                field="persona",
            )
        if history:
            meta: dict[str, object] = {"episode": episode, "turn": number}
            if partner:
                meta["partner_persona"] = list(partner)
            if keep and len(fields) >= 4 and fields[3].strip():
                meta["candidates"] = fields[3].split("|")
            dialogues.append(
                Dialogue(
                    id=f"{path.stem}-{episode:05d}-{number:02d}",
                    persona=list(persona),
                    persona_role="self",
                    context=list(history),
                    reference=reply,
                    source=f"personachat:{path.name}",
                    meta=meta,
                )
            )
        history.append(Turn(speaker="User2", text=reply))
    return dialogues
