"""Baidu's Chinese persona chat, DuLeMon (Xu et al., 2022), in both of its settings.

One JSON object per line. BOTH sessions have ``bot_persona``, ``user_said_persona``,
``user_no_said_persona`` and ``conversation`` lines ``Usr: ...`` / ``Bot: ...<TAB>U1 B2``
(the tab-suffixed ids name the persona sentences the turn is grounded in). SELF sessions
have ``p1_persona`` and ``p2_persona`` and every turn answers in its speaker's persona.
Text is kept exactly as released (word-segmented Chinese included).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from persona_align.data import register_reader
from persona_align.data.text import read_text
from persona_align.errors import InputError
from persona_align.records import Dialogue, Turn

_PERSONA = re.compile(r"^\s*([A-Za-z]+\d+)\s*[:\uff1a]\s*(.*)$", re.S)
_TURN = re.compile(r"^\s*([A-Za-z]+\d*)\s*[:\uff1a]\s*(.*)$", re.S)


def _persona(path: Path, items: Any, where: str, field: str) -> list[tuple[str, str]]:
    if not isinstance(items, list):
        raise InputError(path, "expected a list of persona sentences", where=where, field=field)
    out = []
    for k, item in enumerate(items):
        match = _PERSONA.match(str(item))
        pid, text = (match.group(1), match.group(2)) if match else (f"#{k}", str(item))
        if text.strip():
            out.append((pid, text.strip()))
    return out


def _turns(path: Path, lines: Any, where: str) -> list[tuple[str, str, list[str]]]:
    if not isinstance(lines, list) or not lines:
        raise InputError(path, "expected a non-empty list", where=where, field="conversation")
    turns = []
    for k, line in enumerate(lines):
        body, _, ids = str(line).partition("\t")
        match = _TURN.match(body)
        if not match:
            raise InputError(
                path, "turn has no 'Speaker:' prefix", where=where, field=f"conversation[{k}]"
            )
        turns.append(
            (
                match.group(1),
                match.group(2).strip(),
                re.split(r"[\s,\uff0c]+", ids.strip()) if ids.strip() else [],
            )
        )
    return turns


@register_reader("baidu-personachat", "Baidu Chinese persona chat (DuLeMon SELF/BOTH JSONL)")
def read_baidu(path: Path) -> list[Dialogue]:
    dialogues: list[Dialogue] = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            session = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(
                path, f"malformed JSON: {err.msg} (column {err.colno})", where=where
            ) from None
        if not isinstance(session, dict):
            raise InputError(path, "expected a JSON object", where=where)
        turns = _turns(path, session.get("conversation"), where)
        speakers = list(dict.fromkeys(speaker for speaker, _, _ in turns))
        if "bot_persona" in session:
            personas = {speaker: [] for speaker in speakers}
            bot = next((s for s in speakers if s.lower() == "bot"), None)
            if bot is None:
                raise InputError(
                    path, "BOTH session without 'Bot:' turns", where=where, field="conversation"
                )
            personas[bot] = _persona(path, session["bot_persona"], where, "bot_persona")
            user_persona = [
                t
                for _, t in _persona(
                    path, session.get("user_said_persona", []), where, "user_said_persona"
                )
            ]
        elif "p1_persona" in session and "p2_persona" in session:
            p1 = _persona(path, session["p1_persona"], where, "p1_persona")
            p2 = _persona(path, session["p2_persona"], where, "p2_persona")
            personas = dict(zip(speakers, (p1, p2), strict=False))
            user_persona = []
        else:
            raise InputError(
                path,
                "need bot_persona (BOTH) or p1_persona and p2_persona (SELF)",
                where=where,
                field="bot_persona",
            )
        for i in range(1, len(turns)):
            speaker, text, ids = turns[i]
            persona = personas.get(speaker) or []
            if not persona or not text:
                continue
            context = [
                Turn(speaker="User2" if s == speaker else "User1", text=t)
                for s, t, _ in turns[:i]
                if t
            ]
            if not context:
                continue
            meta: dict[str, Any] = {"session": lineno, "turn": i, "grounding_ids": ids}
            if user_persona:
                meta["user_persona"] = user_persona
            dialogues.append(
                Dialogue(
                    id=f"{path.stem}-{lineno:05d}-{i:02d}",
                    persona=[t for _, t in persona],
                    persona_role="self",
                    context=context,
                    reference=text,
                    source=f"baidu-personachat:{path.name}",
                    persona_grounding=[pid in ids for pid, _ in persona],
                    meta=meta,
                )
            )
    return dialogues
