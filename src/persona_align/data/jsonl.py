"""Our own schema: Dialogue records as JSONL or Parquet."""

from __future__ import annotations

from pathlib import Path

from persona_align.data import register_reader
from persona_align.records import Dialogue, read_records


@register_reader("jsonl", "persona-align Dialogue records (JSONL, or Parquet by suffix)")
def read_jsonl_dialogues(path: Path) -> list[Dialogue]:
    return read_records(path, Dialogue)
