"""Text helpers shared by the dataset readers."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from pathlib import Path

from persona_align.errors import InputError

# Tokens before a period that do not end a sentence ("St. Paul", "Mt. Fuji", "Dr. Who").
_ABBREVIATION_WORDS = "mr mrs ms dr st mt ft jr sr prof gen col lt sgt capt rev vs etc no"
_ABBREVIATIONS = frozenset(f"{_ABBREVIATION_WORDS} approx dept est inc ltd co".split())
# "history,I enjoy", "forts interestingI live": a first-person sentence glued on without a stop.
_GLUED_I = re.compile(r"(?<=[^\W\dA-Z_]|[,)\"\u201d])(?=I(?:'m|\u2019m|'ve|\u2019ve)?\s)")
_BOUNDARY = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)]*(?=\s*[\"'\u201c\u2018(]?[A-Za-z0-9])")


def split_sentences(text: str) -> list[str]:
    """Split persona text into sentences, also where the separator space is missing.

    FoCus personas reach PersoBench CSVs glued together ("...again.I love..."), so a boundary is
    any ``.``/``!``/``?`` followed by a letter or digit, except after an abbreviation, an
    initial ("J.R.R."), or inside a number ("3.5"), a domain ("x.com") or "e.g.".
    """
    text = text.strip()
    pieces: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        end = match.end()
        if not _is_boundary(text, match.start(), end):
            continue
        piece = text[start:end].strip()
        if piece:
            pieces.append(piece)
        start = end
    tail = text[start:].strip()
    if tail:
        pieces.append(tail)
    return [part.strip().rstrip(",").strip() for piece in pieces for part in _GLUED_I.split(piece)]


_PRONOUN_START = re.compile(r"(I|My|I'm|I\u2019m|I've|I\u2019ve|Im|Ive)\b")
_LOWER_PRONOUN_START = re.compile(r"(i|my|i'm|im|i've|ive)\b")


def _is_boundary(text: str, punct_end: int, next_start: int) -> bool:
    before = text[:punct_end]
    if not before.endswith("."):
        return True
    word = re.search(r"([A-Za-z0-9]+)\.+$", before)
    token = word.group(1) if word else ""
    after = text[next_start:].lstrip()
    glued = next_start < len(text) and not text[next_start].isspace()
    if glued and _PRONOUN_START.match(after):
        return True  # "...D.C.I love" and "...Co.I would": a first-person persona sentence
    if token.lower() in _ABBREVIATIONS or (len(token) == 1 and token.isalpha()):
        return False  # "St. Paul", "J. Smith", "U.S.", "e.g."
    if glued:
        if re.match(r"[A-Za-z]\.", after) or (token.isdigit() and after[:1].isdigit()):
            return False  # "Ph.D.", "3.5"
        if after[:1].islower():
            return bool(_LOWER_PRONOUN_START.match(after))  # "x.com" no, "here.i like" yes
    return True


def read_text(path: Path) -> str:
    """Read a UTF-8 file (a BOM is allowed); undecodable bytes are reported with their line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(
            path, f"not valid UTF-8 (byte 0x{data[err.start]:02x})", where=f"line {line}"
        ) from None


def read_csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield ``("row N", row)`` for each data row, checking columns and field counts.

    Rows are numbered from 1 after the header, as a spreadsheet user counts them; a quoted
    field may span lines, so the row number, not the line number, names the place.
    """
    text = read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        header = reader.fieldnames
    except csv.Error as err:
        raise InputError(path, f"malformed CSV header: {err}", where="line 1") from None
    if not header:
        raise InputError(path, "empty file, expected a CSV header")
    for column in required:
        if column not in header:
            raise InputError(
                path,
                f"missing column (header has: {', '.join(header)})",
                where="header",
                field=column,
            )
    rownum = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise InputError(path, f"malformed CSV: {err}", where=f"row {rownum + 1}") from None
        rownum += 1
        where = f"row {rownum}"
        if None in row:
            raise InputError(
                path,
                f"{len(header) + len(row[None])} fields, header has {len(header)}",
                where=where,
            )
        missing = [k for k, v in row.items() if v is None]
        if missing:
            raise InputError(path, "row has too few fields", where=where, field=missing[0])
        yield where, row
