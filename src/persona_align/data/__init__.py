"""Dataset readers: each turns one published format into Dialogue records.

Readers live behind one registry so that ``persona-align data import --format NAME`` and the
pipeline config find them by name; adding a format is adding one module with one
``@register_reader`` function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_align.errors import InputError
from persona_align.files import require_file
from persona_align.records import Dialogue

ReaderFn = Callable[..., list[Dialogue]]


@dataclass(frozen=True)
class Reader:
    name: str
    fn: ReaderFn
    help: str
    options: tuple[str, ...] = ()


READERS: dict[str, Reader] = {}


def register_reader(
    name: str, help: str, options: tuple[str, ...] = ()
) -> Callable[[ReaderFn], ReaderFn]:
    """Register ``fn(path, **options) -> list[Dialogue]`` under ``name``."""

    def wrap(fn: ReaderFn) -> ReaderFn:
        if name in READERS:
            raise ValueError(f"reader {name!r} registered twice")
        READERS[name] = Reader(name, fn, help, options)
        return fn

    return wrap


def reader_for(fmt: str, options: Iterable[str] = ()) -> Reader:
    """The reader of ``fmt``; an unknown format, or an option it does not take, is bad input
    (configs check this when they load, before any stage runs)."""
    reader = READERS.get(fmt)
    if reader is None:
        raise InputError(None, f"unknown format {fmt!r}; known: {', '.join(sorted(READERS))}")
    unknown = sorted(set(options) - set(reader.options))
    if unknown:
        allowed = ", ".join(reader.options) or "none"
        raise InputError(None, f"format {fmt!r} has no option {unknown[0]!r} (options: {allowed})")
    return reader


def read_dialogues(fmt: str, path: str | Path, **options: Any) -> list[Dialogue]:
    """Read ``path`` in format ``fmt``; bad input raises InputError naming file, place and field."""
    reader = reader_for(fmt, options)
    path = require_file(path)
    dialogues = reader.fn(path, **options)
    seen: set[str] = set()
    for dialogue in dialogues:
        if dialogue.id in seen:
            raise InputError(path, f"duplicate dialogue id {dialogue.id!r}", field="id")
        seen.add(dialogue.id)
    return dialogues


# Importing the modules registers their readers.
from persona_align.data import baidu, focus, jsonl, persobench, personachat  # noqa: E402, F401
