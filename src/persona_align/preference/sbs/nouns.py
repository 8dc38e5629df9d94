"""Noun slots: where a response can be changed one noun at a time (SBS's augmentation sites).

SBS tags responses and masks every word whose Penn tag starts with ``NN`` (NN, NNS, NNP,
NNPS). We tag with spaCy (default the embedded ``en_core_web_sm``) and keep only whole
words: a piece of a hyphenated word ("e" and "mail" in "e-mail") or a symbol spaCy calls a
noun ("%") would make a broken sentence when replaced.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_align.errors import InputError
from persona_align.models import resolve

_WORD = re.compile(r"^[^\W\d_]+(?:['-][^\W\d_]+)*$")
COMMON_TAGS = frozenset({"NN", "NNS"})


def is_word(text: str) -> bool:
    """Letters only (an inner hyphen or apostrophe allowed), at least two of them."""
    return len(text) >= 2 and _WORD.match(text) is not None


@dataclass(frozen=True)
class Slot:
    """One noun occurrence in a response: ``text[start:end]`` with Penn tag ``tag``."""

    text: str
    start: int
    end: int
    tag: str

    @property
    def noun(self) -> str:
        return self.text[self.start : self.end]

    def masked(self, mask: str) -> str:
        return self.text[: self.start] + mask + self.text[self.end :]

    def replaced(self, fill: str) -> str:
        """The response with this noun replaced, capitalised like the noun it replaces."""
        if self.noun[:1].isupper() and fill[:1].islower():
            fill = fill[:1].upper() + fill[1:]
        return self.masked(fill)


@functools.lru_cache(maxsize=2)
def load_spacy(name: str = "embedded-spacy") -> Any:
    """A tagging-only spaCy pipeline (no parser, NER or lemmatizer: they are not needed).

    ``name`` is a model name for ``models.resolve`` (``embedded-spacy``, a folder) or an
    installed spaCy package such as ``en_core_web_sm``. Loaded once per process.
    """
    import spacy

    location: str | Path = name
    if name.startswith("embedded") or Path(name).expanduser().is_dir():
        location = resolve(name).location
    try:
        return spacy.load(location, exclude=["parser", "ner", "lemmatizer", "senter"])
    except OSError as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(None, f"cannot load spaCy model {name!r}: {reason}") from None


def _slots(doc: Any) -> list[Slot]:
    text = doc.text
    out = []
    for token in doc:
        if not token.tag_.startswith("NN") or not is_word(token.text):
            continue
        start, end = token.idx, token.idx + len(token.text)
        before = text[start - 1] if start else " "
        after = text[end] if end < len(text) else " "
        if before == "-" or after == "-" or before.isalnum() or after.isalnum():
            continue
        out.append(Slot(text, start, end, token.tag_))
    return out


def find_slots(nlp: Any, texts: Sequence[str], batch_size: int = 256) -> list[list[Slot]]:
    """The noun slots of every text, in text order."""
    return [_slots(doc) for doc in nlp.pipe(texts, batch_size=batch_size)]


def vocabulary(slot_lists: Iterable[Sequence[Slot]]) -> list[tuple[str, str]]:
    """Distinct (noun, tag) pairs in first-seen order; common nouns lower-cased.

    A common noun is stored in lower case so that a sentence-initial "Dogs" does not come
    back capitalised in the middle of another sentence; proper nouns keep their case.
    """
    seen: dict[tuple[str, str], str] = {}
    for slots in slot_lists:
        for slot in slots:
            word = slot.noun.lower() if slot.tag in COMMON_TAGS else slot.noun
            seen.setdefault((word.lower(), slot.tag), word)
    return [(word, tag) for (_, tag), word in seen.items()]
