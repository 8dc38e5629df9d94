"""A SQLite cache of model outputs, so a crashed or interrupted run resumes where it stopped.

Keyed by responder settings + prompt hash + generation parameters. Only answers are stored:
a call that failed (timeout, refused connection...) is not, so a rerun tries it again.
Every result is committed as it arrives; WAL mode lets a reader look while a run writes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from persona_align.files import open_sqlite
from persona_align.generation.base import Result

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    responder TEXT NOT NULL,
    dialogue_id TEXT NOT NULL,
    raw TEXT NOT NULL,
    latency_s REAL,
    usage TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def cache_key(settings: dict[str, Any], params: dict[str, Any], prompt_hash: str) -> str:
    material = json.dumps([settings, params, prompt_hash], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


class GenerationCache:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = open_sqlite(self.path)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._db.commit()

    def get_many(self, keys: Iterable[str]) -> dict[str, Result]:
        keys = list(keys)
        found: dict[str, Result] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT key, raw, latency_s, usage FROM results WHERE key IN ({marks})", chunk
            )
            for key, raw, latency, usage in rows:
                found[key] = Result(raw=raw, latency_s=latency, usage=json.loads(usage))
        return found

    def put(self, key: str, responder: str, dialogue_id: str, result: Result) -> None:
        if result.error is not None:
            return
        self._db.execute(
            "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                responder,
                dialogue_id,
                result.raw,
                result.latency_s,
                json.dumps(result.usage),
                time.time(),
            ),
        )
        self._db.commit()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> GenerationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
