"""Attach existing model outputs to dialogues as Candidate records.

Two layouts: a CSV row-aligned with the prompts file the dialogues came from (``gen_response``
and optional ``response_time``, as PersoBench and PersoDPO release them), or JSONL keyed by
dialogue id (Candidate records, or objects with ``dialogue_id`` and ``raw``/``response``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from persona_align.data.text import read_csv_rows, read_text
from persona_align.errors import InputError
from persona_align.files import require_file
from persona_align.prompting import (
    ExtractionMode,
    Variant,
    extract_response,
    messages_hash,
    persobench_messages,
)
from persona_align.records import Candidate, Dialogue

Extraction = ExtractionMode | Literal["none"]
# Above this share of failed replies a system is more likely read wrong than that bad.
MOSTLY_FAILED = 0.9


def extraction_warning(system: str, failure_ratio: float, replies: int, option: str) -> str | None:
    """One line when more than 90% of a system's replies have no extractable reply. Files of
    replies that were extracted already (PersoBench's ``Responses/``) read with JSON
    extraction fail every reply without a word; ``option`` is the command's way to say so."""
    if not replies or failure_ratio <= MOSTLY_FAILED:
        return None
    return (
        f"warning: {system}: {round(failure_ratio * replies)} of {replies} replies "
        f'({failure_ratio:.0%}) have no extractable {{"response": ...}}; if they were '
        f"extracted already, use {option}"
    )


def _latency(path: Path, value: Any, where: str, field: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        latency = float(value)
    except (TypeError, ValueError):
        raise InputError(path, f"not a number: {value!r}", where=where, field=field) from None
    if latency < 0 or latency != latency:
        raise InputError(
            path, f"must be a non-negative number, got {value!r}", where=where, field=field
        )
    return latency


def _candidate(
    dialogue: Dialogue,
    responder: str,
    raw: str,
    latency: float | None,
    extraction: Extraction,
    variant: Variant,
    error: str | None = None,
) -> Candidate:
    if extraction == "none":  # the file already holds extracted replies; empty means failure
        response = raw.strip() or None
    else:
        response = extract_response(raw, extraction)
    return Candidate(
        dialogue_id=dialogue.id,
        responder=responder,
        raw=raw,
        response=response,
        valid=response is not None,
        latency_s=latency,
        prompt_hash=messages_hash(persobench_messages(dialogue, variant)),
        error=error,
    )


def import_responses(
    path: str | Path,
    dialogues: list[Dialogue],
    responder: str | None = None,
    extraction: Extraction = "lenient",
    variant: Variant = "vanilla",
    subset: bool = False,
) -> list[Candidate]:
    """One Candidate per dialogue, in dialogue order; a dialogue without output is a failure.

    JSONL outputs for ids that are not among ``dialogues`` are an error (a typo would silently
    turn into failures), unless ``subset``: the dialogues are a part of what the file answers.
    """
    path = require_file(path)
    name = responder or path.stem
    if path.suffix.lower() == ".csv":
        rows = list(read_csv_rows(path, ("gen_response",)))
        if len(rows) != len(dialogues):
            raise InputError(
                path,
                f"{len(rows)} response rows for {len(dialogues)} dialogues; a responses CSV must "
                "be row-aligned with the prompts file the dialogues were read from",
            )
        return [
            _candidate(
                dialogue,
                name,
                row["gen_response"],
                _latency(path, row.get("response_time"), where, "response_time"),
                extraction,
                variant,
            )
            for dialogue, (where, row) in zip(dialogues, rows, strict=True)
        ]
    by_id = {d.id: d for d in dialogues}
    found: dict[str, Candidate] = {}
    lines = [(n, line) for n, line in enumerate(read_text(path).splitlines(), start=1)
             if line.strip()]  # fmt: skip
    if not lines:
        raise InputError(path, "no responses")
    for lineno, line in lines:
        where = f"line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(
                path, f"malformed JSON: {err.msg} (column {err.colno})", where=where
            ) from None
        if not isinstance(obj, dict):
            raise InputError(path, "expected a JSON object", where=where)
        dialogue_id = obj.get("dialogue_id")
        if not isinstance(dialogue_id, str) or not dialogue_id:
            raise InputError(path, "missing", where=where, field="dialogue_id")
        if dialogue_id not in by_id:
            if subset:
                continue
            raise InputError(
                path, f"no dialogue with id {dialogue_id!r}", where=where, field="dialogue_id"
            )
        if dialogue_id in found:
            raise InputError(
                path, f"second output for {dialogue_id!r}", where=where, field="dialogue_id"
            )
        text = obj.get("raw", obj.get("gen_response", obj.get("response")))
        if not isinstance(text, str):
            raise InputError(
                path,
                "expected a string output in raw, gen_response or response",
                where=where,
                field="raw",
            )
        latency = _latency(path, obj.get("latency_s", obj.get("response_time")), where, "latency_s")
        found[dialogue_id] = _candidate(
            by_id[dialogue_id], obj.get("responder") or name, text, latency, extraction, variant
        )
    return [
        found.get(d.id)
        or _candidate(d, name, "", None, "none", variant, error=f"no output in {path.name}")
        for d in dialogues
    ]
