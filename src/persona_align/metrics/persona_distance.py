"""P score (PersoBench's "persona distance"): how close a reply's words are to the persona's.

P = cosine(mean vector of the persona's content words, mean vector of the reply's), higher =
closer. Content words: spaCy's rule-based English tokenizer splits the text (no model is
loaded; contractions split as spaCy does, "don't" → "do", "n't"), tokens are lower-cased as in
PersoBench (also for the case-sensitive GoogleNews vectors), tokens without a letter or digit
are dropped, then spaCy's English stop-word list. PersoBench split on whitespace, so "dog." and
"dog" differed and neither matched a word vector; it used NLTK's stop-word list.

Backends:
- ``word2vec``: the mean of word vectors from a KeyedVectors file (``vectors``; word2vec binary
  or text format, as PersoBench's GoogleNews vectors). Out-of-vocabulary words are skipped; when
  the persona or the reply has no in-vocabulary content word, P = 0.0 (PersoBench's rule).
- ``static`` (default): the same mean of word vectors, offline: a word's vector is the mean of
  its word pieces' rows in the input-embedding table of ``model`` (default ``embedded-minilm``).
  On the shared PersoDPO pool its per-reply rank correlation with the authors' word2vec values
  is 0.69, against 0.51 for ``sentence`` (benchmarks/RESULTS.md).
- ``sentence``: a sentence-transformers model (default ``embedded-minilm``) embeds the
  stop-word-stripped texts; when either side has no content word, P = 0.0 likewise.

Failed replies get 0.0, PersoBench's "worst value" for P, although a cosine can go below 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from persona_align import devices
from persona_align.errors import InputError
from persona_align.metrics.base import Metric, ScoreItem, Unavailable, register_metric
from persona_align.metrics.loading import first_line, pretrained_source
from persona_align.models import file_digest, model_version
from persona_align.prompting import format_persona

Backend = Literal["static", "sentence", "word2vec"]
BACKENDS: tuple[str, ...] = get_args(Backend)


@cache
def _spacy_tokenizer() -> Any:
    import spacy

    return spacy.blank("en").tokenizer


def content_words(text: str) -> list[str]:
    """Lower-cased tokens of ``text`` that are neither punctuation nor English stop words."""
    from spacy.lang.en.stop_words import STOP_WORDS

    words = (token.lower_ for token in _spacy_tokenizer()(text))
    return [w for w in words if any(c.isalnum() for c in w) and w not in STOP_WORDS]


def _mean_vector_cosine(
    persona: list[str], reply: list[str], vector: Callable[[str], np.ndarray | None]
) -> float:
    """Cosine of the two sides' mean word vectors; words without a vector are skipped and a
    side with none scores 0.0 (PersoBench's rule)."""
    means = []
    for words in (persona, reply):
        found = [v for v in map(vector, words) if v is not None]
        if not found:
            return 0.0
        means.append(np.mean(found, axis=0, dtype=np.float64))
    return _cosine(*means)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms == 0.0:
        return 0.0
    return min(1.0, max(-1.0, float(np.dot(a, b)) / norms))


@register_metric("p")
class PersonaDistance(Metric):
    description = (
        "persona distance: cosine of mean vectors of persona and reply words (higher = closer)"
    )
    failure_value = 0.0

    def __init__(
        self,
        backend: Backend = "static",
        model: str = "embedded-minilm",
        vectors: str | None = None,
        binary: bool | None = None,
        limit: int | None = None,
        batch_size: int = 64,
    ) -> None:
        """``binary`` defaults to True for a ``.bin``/``.bin.gz`` file; ``limit`` loads only
        the first N vectors (the full GoogleNews file needs about 3.6 GB of memory)."""
        super().__init__()
        if backend not in BACKENDS:
            raise InputError(None, f"metric 'p': backend must be one of {', '.join(BACKENDS)}")
        if batch_size < 1:
            raise InputError(None, f"metric 'p': batch_size must be at least 1, got {batch_size}")
        self.backend = backend
        self.model_name = model
        self.vectors = vectors
        self.binary = binary
        self.limit = limit
        self.batch_size = batch_size
        self._version: str | None = None
        self._encoder: Any = None
        self._keyed: Any = None
        self._pieces: dict[str, np.ndarray | None] = {}  # static backend: vector per word

    @property
    def model(self) -> str | None:
        return self.vectors if self.backend == "word2vec" else self.model_name

    def settings(self) -> dict[str, Any]:
        common = {"name": self.name, "backend": self.backend, "version": self._version}
        if self.backend != "word2vec":
            return {**common, "model": self.model_name}
        return {**common, "vectors": self.vectors, "binary": self.binary, "limit": self.limit}

    def load(self) -> None:
        if self._encoder is not None or self._keyed is not None:
            return
        if self.backend == "word2vec":
            self._load_vectors()
            return
        from sentence_transformers import SentenceTransformer

        location, local_only = pretrained_source(self.model_name)
        try:
            self._encoder = SentenceTransformer(
                location, local_files_only=local_only, device=devices.target("P encoder")
            )
        except (OSError, ValueError) as err:
            raise Unavailable(f"cannot load {self.model_name!r}: {first_line(err)}") from None
        self._version = model_version(self.model_name)

    def _load_vectors(self) -> None:
        from gensim.models import KeyedVectors

        if not self.vectors:
            raise Unavailable(
                "backend 'word2vec' needs the option vectors=<word2vec file> "
                "(PersoBench used GoogleNews-vectors-negative300.bin)"
            )
        path = Path(self.vectors).expanduser()
        if not path.is_file():
            raise Unavailable(f"word vectors file {str(path)!r} not found")
        binary = self.binary if self.binary is not None else path.name.endswith((".bin", ".bin.gz"))
        try:
            self._keyed = KeyedVectors.load_word2vec_format(path, binary=binary, limit=self.limit)
        except (OSError, ValueError, UnicodeDecodeError, EOFError) as err:
            kind = "binary" if binary else "text"
            raise Unavailable(f"cannot read {str(path)!r} as {kind} word2vec: {err}") from None
        self._version = file_digest(path)[:16]

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        self.load()
        personas = [format_persona(item.dialogue.persona) for item in items]
        replies = [item.response for item in items]
        words = {text: content_words(text) for text in {*personas, *replies}}
        pairs = [(words[p], words[r]) for p, r in zip(personas, replies, strict=True)]
        if self.backend == "sentence":
            return self._sentence(pairs)
        vector = self._keyed_vector if self.backend == "word2vec" else self._word_vector
        return [_mean_vector_cosine(persona, reply, vector) for persona, reply in pairs]

    def _keyed_vector(self, word: str) -> np.ndarray | None:
        keyed = self._keyed
        return keyed[word] if word in keyed.key_to_index else None

    def _word_vector(self, word: str) -> np.ndarray | None:
        """Mean of the word's pieces in the input-embedding table (None when all are unknown)."""
        if word not in self._pieces:
            tokenizer = self._encoder.tokenizer
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            ids = [i for i in ids if i != tokenizer.unk_token_id]  # no vector, as OOV in word2vec
            table = self._encoder[0].auto_model.get_input_embeddings().weight
            found = table[ids].detach().float().mean(0).cpu().numpy() if ids else None
            self._pieces[word] = found  # .cpu(): the encoder sits on a GPU when there is one
        return self._pieces[word]

    def _sentence(self, pairs: list[tuple[list[str], list[str]]]) -> list[float | None]:
        """Each distinct stripped text is embedded once (personas repeat across candidates)."""
        stripped = [(" ".join(persona), " ".join(reply)) for persona, reply in pairs]
        unique = sorted({text for pair in stripped for text in pair if text})
        vectors: dict[str, np.ndarray] = {}
        if unique:
            encoded = self._encoder.encode(
                unique, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
            )
            vectors = dict(zip(unique, encoded, strict=True))
        return [_cosine(vectors[p], vectors[r]) if p and r else 0.0 for p, r in stripped]
