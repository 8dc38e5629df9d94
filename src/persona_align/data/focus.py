"""The official FoCus release (Jang et al., AAAI 2022): one Dialogue per machine turn."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from persona_align.data import register_reader
from persona_align.data.text import read_text
from persona_align.errors import InputError
from persona_align.records import Dialogue, Turn


def load_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise InputError(
            path, f"malformed JSON: {err.msg} (column {err.colno})", where=f"line {err.lineno}"
        ) from None


def _require(path: Path, obj: dict[str, Any], key: str, where: str, kinds: tuple[type, ...]) -> Any:
    if key not in obj:
        raise InputError(path, "missing", where=where, field=key)
    value = obj[key]
    if not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        got = type(value).__name__
        raise InputError(path, f"expected {expected}, got {got}", where=where, field=key)
    return value


def _history_turns(history: list[str]) -> list[Turn]:
    """Turns alternate human (User1) and machine (User2); the last one is the human's."""
    n = len(history)
    return [
        Turn(speaker="User1" if (n - 1 - k) % 2 == 0 else "User2", text=text.strip())
        for k, text in enumerate(history)
        if text.strip()
    ]


@register_reader("focus-json", "FoCus release JSON (data[] with persona, knowledge, utterance[])")
def read_focus(path: Path) -> list[Dialogue]:
    doc = load_json(path)
    entries = doc.get("data") if isinstance(doc, dict) else doc
    if not isinstance(entries, list):
        raise InputError(path, "expected a top-level 'data' list", field="data")
    dialogues = []
    for i, entry in enumerate(entries):
        where = f"data[{i}]"
        if not isinstance(entry, dict):
            raise InputError(path, "expected an object", where=where)
        dialog_id = str(entry.get("dialogID", i))
        base_persona = _require(path, entry, "persona", where, (list,))
        utterances = _require(path, entry, "utterance", where, (list,))
        for j, utt in enumerate(utterances):
            uwhere = f"{where}.utterance[{j}]"
            if not isinstance(utt, dict):
                raise InputError(path, "expected an object", where=uwhere)
            key = f"dialogue{j + 1}"
            dialog = _require(path, utt, key, uwhere, (list, str))
            if isinstance(dialog, str):  # leaderboard test files: only the user's question
                history, reply = [dialog], None
            else:
                history, reply = dialog[:-1], (dialog[-1].strip() or None) if dialog else None
            context = _history_turns([str(t) for t in history])
            if not context:
                raise InputError(path, "empty dialogue history", where=uwhere, field=key)
            candidates = utt.get("persona_candidate") or base_persona
            grounding = utt.get("persona_grounding")
            pairs = [
                (
                    str(s).strip(),
                    grounding[k] if isinstance(grounding, list) and k < len(grounding) else None,
                )
                for k, s in enumerate(candidates[:5])
            ]
            pairs = [(s, g) for s, g in pairs if s]
            if not pairs:
                raise InputError(path, "empty persona", where=uwhere, field="persona_candidate")
            labels = [g for _, g in pairs]
            knowledge = None
            k_cands, k_index = utt.get("knowledge_candidates"), utt.get("knowledge_answer_index")
            if (
                isinstance(k_cands, list)
                and isinstance(k_index, int)
                and 0 <= k_index < len(k_cands)
            ):
                knowledge = [str(k_cands[k_index])]
            dialogues.append(
                Dialogue(
                    id=f"{dialog_id}-{j + 1}",
                    persona=[s for s, _ in pairs],
                    persona_role="user",
                    context=context,
                    reference=reply,
                    knowledge=knowledge,
                    source=f"focus-json:{path.name}",
                    persona_grounding=[bool(g) for g in labels] if None not in labels else None,
                    meta={
                        "dialog_id": dialog_id,
                        "turn": j + 1,
                        "knowledge_answer_index": k_index,
                        "landmark_link": entry.get("landmark_link"),
                    },
                )
            )
    return dialogues
