"""Readers for the NLI sets that train and check the model behind the C and UE metrics.

Every reader returns ``(premise, hypothesis, label)`` triples with the label spelled one way,
``entailment``/``neutral``/``contradiction``, whatever the file calls it (DNLI says
positive/negative, SICK shouts). Bad input raises InputError naming file, line and field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, NamedTuple

from persona_align.data.text import read_text
from persona_align.errors import InputError

Label = Literal["entailment", "neutral", "contradiction"]
LABELS: tuple[Label, ...] = ("entailment", "neutral", "contradiction")
FORMATS = ("dnli", "mnli-hard", "snli-hard", "sick")

# Spellings seen in datasets and in models' config.id2label.
_SYNONYMS: dict[str, Label] = {
    "entailment": "entailment",
    "entail": "entailment",
    "entails": "entailment",
    "entailed": "entailment",
    "positive": "entailment",
    "neutral": "neutral",
    "contradiction": "contradiction",
    "contradict": "contradiction",
    "contradicts": "contradiction",
    "contradictory": "contradiction",
    "negative": "contradiction",
}


class NLIPair(NamedTuple):
    premise: str
    hypothesis: str
    label: Label


def normalise_label(name: str) -> Label | None:
    """The canonical label for a spelling like ``ENTAILMENT`` or ``positive``; None if unknown."""
    return _SYNONYMS.get(name.strip().lower())


# Each format's own spellings: a reader accepts exactly these, so a mislabelled file is caught.
_DNLI_LABELS: dict[str, Label] = {
    "positive": "entailment",
    "neutral": "neutral",
    "negative": "contradiction",
}
_PLAIN_LABELS: dict[str, Label] = {label: label for label in LABELS}
_SICK_LABELS: dict[str, Label] = {label.upper(): label for label in LABELS}


def _label(path: Path, value: str, where: str, field: str, spellings: dict[str, Label]) -> Label:
    label = spellings.get(value.strip())
    if label is None:
        expected = "/".join(spellings)
        raise InputError(
            path, f"unknown label {value!r}; expected {expected}", where=where, field=field
        )
    return label


def _text(path: Path, value: object, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise InputError(
            path, f"expected text, got {type(value).__name__}", where=where, field=field
        )
    if not value.strip():
        raise InputError(path, "is empty", where=where, field=field)
    return value.strip()


def read_dnli(path: Path) -> list[NLIPair]:
    """Dialogue NLI lines ``sentence1</s>sentence2</s>label`` with positive/neutral/negative."""
    pairs = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        fields = line.split("</s>")
        if len(fields) != 3:
            raise InputError(
                path, f"expected 3 fields separated by '</s>', found {len(fields)}", where=where
            )
        s1, s2, label = fields
        pairs.append(
            NLIPair(
                _text(path, s1, where, "sentence1"),
                _text(path, s2, where, "sentence2"),
                _label(path, label, where, "label", _DNLI_LABELS),
            )
        )
    return pairs


def read_mnli_hard(path: Path) -> list[NLIPair]:
    """Three line-aligned files ``s1.test``, ``s2.test``, ``labels.test`` (path = their folder)."""
    folder = path if path.is_dir() else path.parent
    names = {"premise": "s1.test", "hypothesis": "s2.test", "label": "labels.test"}
    columns: dict[str, list[str]] = {}
    for field, name in names.items():
        file = folder / name
        if not file.is_file():
            raise InputError(
                folder, f"no {name} here; MNLI-hard needs s1.test, s2.test and labels.test"
            )
        columns[field] = read_text(file).splitlines()
    sizes = {names[f]: len(lines) for f, lines in columns.items()}
    if len(set(sizes.values())) != 1:
        counts = ", ".join(f"{name} {n}" for name, n in sizes.items())
        raise InputError(folder, f"the three files must have as many lines: {counts}")
    pairs = []
    for index, (s1, s2, label) in enumerate(
        zip(columns["premise"], columns["hypothesis"], columns["label"], strict=True)
    ):
        where = f"line {index + 1}"
        if not (s1.strip() or s2.strip() or label.strip()):
            continue
        pairs.append(
            NLIPair(
                _text(folder / names["premise"], s1, where, "premise"),
                _text(folder / names["hypothesis"], s2, where, "hypothesis"),
                _label(folder / names["label"], label, where, "label", _PLAIN_LABELS),
            )
        )
    return pairs


def read_snli_hard(path: Path) -> list[NLIPair]:
    """SNLI JSON lines (``sentence1``, ``sentence2``, ``gold_label``).

    Pairs whose gold label is ``-`` (annotators did not agree) are skipped, as SNLI's own
    evaluation does.
    """
    pairs = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(
                path, f"malformed JSON: {err.msg} (column {err.colno})", where=where
            ) from None
        if not isinstance(obj, dict):
            raise InputError(path, f"expected a JSON object, got {type(obj).__name__}", where=where)
        for field in ("sentence1", "sentence2", "gold_label"):
            if field not in obj:
                raise InputError(path, "is missing", where=where, field=field)
        gold = obj["gold_label"]
        if gold == "-":
            continue
        pairs.append(
            NLIPair(
                _text(path, obj["sentence1"], where, "sentence1"),
                _text(path, obj["sentence2"], where, "sentence2"),
                _label(path, str(gold), where, "gold_label", _PLAIN_LABELS),
            )
        )
    return pairs


def read_sick(path: Path) -> list[NLIPair]:
    """SICK's tab-separated file with a header (``sentence_A``, ``sentence_B``,
    ``entailment_judgment``)."""
    lines = read_text(path).splitlines()
    if not lines:
        raise InputError(path, "empty file, expected a tab-separated header")
    header = lines[0].split("\t")
    needed = ("sentence_A", "sentence_B", "entailment_judgment")
    missing = [name for name in needed if name not in header]
    if missing:
        raise InputError(path, f"header lacks column {missing[0]!r}", where="line 1")
    index = {name: header.index(name) for name in needed}
    pairs = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        where = f"line {lineno}"
        cells = line.split("\t")
        if len(cells) != len(header):
            raise InputError(
                path,
                f"expected {len(header)} tab-separated fields, found {len(cells)}",
                where=where,
            )
        label = cells[index["entailment_judgment"]]
        pairs.append(
            NLIPair(
                _text(path, cells[index["sentence_A"]], where, "sentence_A"),
                _text(path, cells[index["sentence_B"]], where, "sentence_B"),
                _label(path, label, where, "entailment_judgment", _SICK_LABELS),
            )
        )
    return pairs


_READERS = {
    "dnli": read_dnli,
    "mnli-hard": read_mnli_hard,
    "snli-hard": read_snli_hard,
    "sick": read_sick,
}


def guess_format(path: Path) -> str:
    """The format a path is in, from its name or first line, so ``--format`` can be left out."""
    if path.is_dir() or path.name in {"s1.test", "s2.test", "labels.test"}:
        return "mnli-hard"
    if path.suffix.lower() == ".jsonl":
        return "snli-hard"
    with open(path, encoding="utf-8", errors="replace") as handle:
        first = handle.readline()
    if "</s>" in first:
        return "dnli"
    if "entailment_judgment" in first.rstrip("\r\n").split("\t"):
        return "sick"
    raise InputError(path, f"cannot tell the NLI format; pass --format ({', '.join(FORMATS)})")


def read_nli(path: str | Path, fmt: str | None = None) -> list[NLIPair]:
    """Read an NLI file in ``fmt`` (guessed when None); an empty result is an error."""
    path = Path(path)
    if fmt is not None and fmt not in _READERS:
        raise InputError(None, f"unknown NLI format {fmt!r}; known: {', '.join(FORMATS)}")
    if not path.exists():
        raise InputError(path, "does not exist")
    fmt = fmt or guess_format(path)
    if path.is_dir() and fmt != "mnli-hard":
        raise InputError(path, "is a directory, expected a file")
    pairs = _READERS[fmt](path)
    if not pairs:
        raise InputError(path, f"no {fmt} pairs found")
    return pairs
