"""Score candidate files: streamed in chunks, cached by content hash, one status per metric.

Memory stays flat in the number of candidates: they are read, scored and written one chunk at
a time. A value is cached under a hash of the metric's settings and the exact inputs (persona,
context, reference, reply, raw output), so re-scoring unchanged replies is free.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_align.errors import InputError
from persona_align.files import open_sqlite
from persona_align.metrics.base import Metric, ScoreItem, Unavailable
from persona_align.records import Candidate, Dialogue, ScoredCandidate


@dataclass
class MetricStatus:
    """Whether a metric could be loaded, and the settings its values were computed with (what
    the score cache keys on; None when it was not prepared here)."""

    name: str
    model: str | None
    available: bool = True
    reason: str | None = None
    settings: dict[str, Any] | None = None


class ScoreCache:
    """SQLite map from (metric settings, inputs) hash to a value (NULL = not computable)."""

    def __init__(self, path: str | Path) -> None:
        self._db = open_sqlite(path)
        self._db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value REAL)")
        self._db.commit()

    def get_many(self, keys: Sequence[str]) -> dict[str, float | None]:
        found: dict[str, float | None] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            found.update(
                self._db.execute(f"SELECT key, value FROM scores WHERE key IN ({marks})", chunk)
            )
        return found

    def put_many(self, rows: Iterable[tuple[str, float | None]]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?)", rows)
        self._db.commit()

    def close(self) -> None:
        self._db.close()


def _item_key(settings: str, item: ScoreItem) -> str:
    d = item.dialogue
    material = json.dumps(
        [settings, d.persona, d.persona_role, [t.model_dump() for t in d.context], d.reference,
         d.knowledge,
         item.candidate.response, item.candidate.raw],
        ensure_ascii=False,
    )  # fmt: skip
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def prepare_metrics(metrics: Sequence[Metric], dialogues: Sequence[Dialogue]) -> list[MetricStatus]:
    """Load every metric once; an unresolvable model makes that metric unavailable, not zero."""
    statuses = []
    for metric in metrics:
        status = MetricStatus(metric.name, metric.model)
        try:
            metric.fit(dialogues)
            metric.load()
        except Unavailable as why:
            status.available, status.reason = False, str(why)
        status.settings = metric.settings()
        statuses.append(status)
    return statuses


def score_stream(
    dialogues: dict[str, Dialogue],
    candidates: Iterable[Candidate],
    metrics: Sequence[Metric],
    statuses: Sequence[MetricStatus],
    cache: ScoreCache | None = None,
    chunk_size: int = 512,
    source: str | Path | None = None,
) -> Iterator[ScoredCandidate]:
    """Yield one ScoredCandidate per candidate, in order; failures get each metric's worst value,
    candidates with a call error (no reply came back) no value at all."""
    live = [
        (m, json.dumps(m.settings(), sort_keys=True))
        for m, s in zip(metrics, statuses, strict=True)
        if s.available
    ]
    chunk: list[Candidate] = []
    index = 0

    def flush() -> Iterator[ScoredCandidate]:
        items = []
        for offset, candidate in enumerate(chunk):
            dialogue = dialogues.get(candidate.dialogue_id)
            if dialogue is None:
                raise InputError(
                    source,
                    f"no dialogue with id {candidate.dialogue_id!r} in the dialogues file",
                    where=f"record {index - len(chunk) + offset + 1}",
                    field="dialogue_id",
                )
            items.append(ScoreItem(dialogue, candidate))
        values: dict[str, list[float | None]] = {m.name: [None] * len(items) for m in metrics}
        for metric, settings in live:
            column = values[metric.name]
            todo: list[int] = []
            for i, item in enumerate(items):
                if item.candidate.error is not None:
                    continue  # no reply came back (a server down): nothing of the model's to score
                if not item.candidate.valid:
                    column[i] = metric.failure_value
                elif metric.needs_reference and not (item.dialogue.reference or "").strip():
                    column[i] = None
                else:
                    todo.append(i)
            keys = [_item_key(settings, items[i]) for i in todo]
            cached = cache.get_many(keys) if cache is not None else {}
            missing = [(i, k) for i, k in zip(todo, keys, strict=True) if k not in cached]
            for i, k in zip(todo, keys, strict=True):
                if k in cached:
                    column[i] = cached[k]
            if missing:
                fresh = metric.score([items[i] for i, _ in missing])
                for (i, _), value in zip(missing, fresh, strict=True):
                    column[i] = value
                if cache is not None:
                    cache.put_many((k, v) for (_, k), v in zip(missing, fresh, strict=True))
        for i, item in enumerate(items):
            scores = {m.name: values[m.name][i] for m in metrics}
            yield ScoredCandidate(**item.candidate.model_dump(), scores=scores, total=None)

    for candidate in candidates:
        chunk.append(candidate)
        index += 1
        if len(chunk) >= chunk_size:
            yield from flush()
            chunk = []
    if chunk:
        yield from flush()
