"""Summaries of record files for ``persona-align data stats`` (numbers a person checks first)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from statistics import fmean
from typing import Any

from pydantic import BaseModel

from persona_align.data.text import read_text
from persona_align.errors import InputError
from persona_align.files import require_file
from persona_align.records import (
    RECORD_TYPES,
    Candidate,
    Dialogue,
    PreferencePair,
    ScoredCandidate,
    read_records,
)


def detect_type(path: Path) -> str:
    """Guess the record type of a JSONL/Parquet file from the keys of its first record."""
    require_file(path)
    if path.suffix.lower() in {".parquet", ".pq"}:
        import pyarrow.parquet as pq

        try:
            keys = set(pq.read_schema(path).names)
        except Exception as err:
            raise InputError(path, f"not a readable Parquet file ({err})") from None
    else:
        first = next((line for line in read_text(path).splitlines() if line.strip()), None)
        if first is None:
            raise InputError(path, "empty file, nothing to detect the record type from")
        try:
            obj = json.loads(first)
        except json.JSONDecodeError as err:
            raise InputError(path, f"malformed JSON: {err.msg}", where="line 1") from None
        keys = set(obj) if isinstance(obj, dict) else set()
    for name, keyset in (
        ("pair", {"chosen", "rejected"}),
        ("scored", {"scores"}),
        ("candidate", {"responder"}),
        ("dialogue", {"persona", "context"}),
    ):
        if keyset <= keys:
            return name
    raise InputError(path, "cannot tell the record type; pass --type", where="line 1")


def load(path: Path, kind: str) -> list[BaseModel]:
    if kind == "auto":
        kind = detect_type(path)
    if kind not in RECORD_TYPES:
        raise InputError(
            None, f"unknown record type {kind!r}; known: auto, {', '.join(RECORD_TYPES)}"
        )
    records = read_records(path, RECORD_TYPES[kind])
    if not records:
        raise InputError(path, f"no {kind} records")
    return records


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "min": round(min(values), 3),
        "mean": round(fmean(values), 3),
        "max": round(max(values), 3),
    }


def describe(records: list[BaseModel]) -> dict[str, Any]:
    """Counts and spreads for one file of records of a single type."""
    if not records:
        return {"records": 0}
    first = records[0]
    if isinstance(first, Dialogue):
        dialogues: list[Dialogue] = records  # type: ignore[assignment]
        with_ref = [d for d in dialogues if d.reference]
        return {
            "type": "dialogue",
            "records": len(dialogues),
            "sources": dict(Counter(d.source for d in dialogues)),
            "persona_sentences": _spread([len(d.persona) for d in dialogues]),
            "context_turns": _spread([len(d.context) for d in dialogues]),
            "with_reference": len(with_ref),
            "reference_words": _spread([len(d.reference.split()) for d in with_ref]),
            "with_knowledge": sum(1 for d in dialogues if d.knowledge),
            "with_persona_grounding": sum(1 for d in dialogues if d.persona_grounding is not None),
        }
    if isinstance(first, PreferencePair):
        pairs: list[PreferencePair] = records  # type: ignore[assignment]
        return {
            "type": "pair",
            "records": len(pairs),
            "dialogues": len({p.dialogue_id for p in pairs}),
            "rules": dict(Counter(p.rule for p in pairs)),
            "score_gap": _spread([p.score_chosen - p.score_rejected for p in pairs]),
            "weight": _spread([p.weight for p in pairs]),
        }
    if isinstance(first, Candidate):
        candidates: list[Candidate] = records  # type: ignore[assignment]
        by_responder: dict[str, list[Candidate]] = {}
        for c in candidates:
            by_responder.setdefault(c.responder, []).append(c)
        responders = {}
        for name, items in by_responder.items():
            latencies = [c.latency_s for c in items if c.latency_s is not None]
            valid = sum(c.valid for c in items)
            answered = sum(c.error is None for c in items)  # a call error is not a model failure
            entry: dict[str, Any] = {
                "candidates": len(items),
                "valid": valid,
                "errors": len(items) - answered,
                "failure_ratio": round(1 - valid / answered, 4) if answered else None,
                "mean_latency_s": round(fmean(latencies), 4) if latencies else None,
            }
            if isinstance(items[0], ScoredCandidate):
                metrics = sorted({m for c in items for m in c.scores})  # type: ignore[attr-defined]
                entry["scores"] = {
                    m: _spread([v for c in items if (v := c.scores.get(m)) is not None])  # type: ignore[attr-defined]
                    for m in metrics
                }
            responders[name] = entry
        return {
            "type": "scored" if isinstance(first, ScoredCandidate) else "candidate",
            "records": len(candidates),
            "dialogues": len({c.dialogue_id for c in candidates}),
            "responders": responders,
        }
    raise TypeError(f"no summary for {type(first).__name__}")
