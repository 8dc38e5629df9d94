"""Fillers: what replaces a masked noun. A small registry, one class per strategy.

- ``mask-lm``: a fill-mask model (SBS used ``facebook/bart-large``) proposes tokens for the
  mask; any HF checkpoint with a masked-LM head works (BERT, RoBERTa, BART, a local folder).
  SBS's released code let BART regenerate the whole sentence, which can change more than the
  noun; here exactly one token is filled, so an augmentation differs in one noun only.
- ``neighbour`` (the offline default): the nouns nearest to the masked one by cosine of
  sentence-transformer embeddings (default the embedded all-MiniLM-L6-v2), drawn from the
  nouns of the corpus itself, preferring the same Penn tag (plural for plural).
- ``chat``: a chat model (default the embedded SmolLM2) is asked to fill the blank.

Every filler returns, per slot, ranked proposals that are plain words and not stop words;
the dataset builder skips proposals equal to the original noun and picks one.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from persona_align import devices
from persona_align.errors import InputError
from persona_align.models import DTYPES, load_causal_lm, resolve
from persona_align.preference.sbs.nouns import Slot, is_word


def _stop_words() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS)


def clean_fill(text: str) -> str | None:
    """The first word of a proposal, if it is a content word (no stop word, no sub-word piece)."""
    words = text.strip().split()
    if not words:
        return None
    word = words[0].strip("\"'`.,;:!?()[]{}*")
    if not is_word(word) or word.lower() in _stop_words():
        return None
    return word


def _positive(filler: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(
            None, f"SBS filler {filler!r}: {name} must be a positive integer, got {value!r}"
        )


class Filler(ABC):
    """Proposes replacements for masked nouns; ``load`` fails fast with an InputError."""

    name: ClassVar[str]
    needs_vocabulary: ClassVar[bool] = False

    def settings(self) -> dict[str, Any]:
        """What changes the fills: recorded in the run summary."""
        return {"name": self.name}

    def load(self, vocabulary: Sequence[tuple[str, str]]) -> None:  # noqa: B027 - optional hook
        """Load the model; fillers with ``needs_vocabulary`` get the corpus (noun, tag) pairs."""

    @abstractmethod
    def fill(self, slots: Sequence[Slot]) -> list[list[str]]:
        """Ranked proposals (best first, possibly none) for every slot."""


FILLERS: dict[str, type[Filler]] = {}


def register_filler(name: str) -> Callable[[type[Filler]], type[Filler]]:
    def wrap(cls: type[Filler]) -> type[Filler]:
        if name in FILLERS:
            raise ValueError(f"SBS filler {name!r} registered twice")
        cls.name = name
        FILLERS[name] = cls
        return cls

    return wrap


def make_filler(name: str, **options: Any) -> Filler:
    factory = FILLERS.get(name)
    if factory is None:
        raise InputError(None, f"unknown SBS filler {name!r}; known: {', '.join(sorted(FILLERS))}")
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as err:
        raise InputError(None, f"SBS filler {name!r}: {err}") from None
    return factory(**options)


def _unloadable(filler: str, model: str, err: Exception) -> InputError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return InputError(None, f"SBS filler {filler!r}: cannot load {model!r}: {reason}")


@register_filler("mask-lm")
class MaskLMFiller(Filler):
    """Top tokens of a masked LM at the mask, as a fill-mask pipeline ranks them."""

    def __init__(
        self,
        model: str = "facebook/bart-large",
        candidates: int = 2,
        batch_size: int = 32,
        search: int = 50,
    ) -> None:
        """``candidates`` proposals per slot (SBS kept BART's top 2), found among the ``search``
        most likely tokens (sub-word pieces, punctuation and stop words are passed over)."""
        for key, value in (("candidates", candidates), ("batch_size", batch_size)):
            _positive("mask-lm", key, value)
        _positive("mask-lm", "search", search)
        self.model_name = model
        self.candidates = candidates
        self.batch_size = batch_size
        self.search = max(search, candidates)
        self._model: Any = None
        self._tokenizer: Any = None

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model_name, "candidates": self.candidates}

    def load(self, vocabulary: Sequence[tuple[str, str]]) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        from persona_align.metrics.base import Unavailable
        from persona_align.metrics.loading import pretrained_source

        try:
            location, local_only = pretrained_source(self.model_name)
        except Unavailable as err:
            raise InputError(None, f"SBS filler 'mask-lm': {err}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local_only)
            model = AutoModelForMaskedLM.from_pretrained(
                location, local_files_only=local_only, **devices.load_kwargs()
            )
        except (OSError, ValueError) as err:
            raise _unloadable("mask-lm", self.model_name, err) from None
        if tokenizer.mask_token is None:
            raise InputError(None, f"SBS filler 'mask-lm': {self.model_name!r} has no mask token")
        devices.place(model, "mask-lm filler").eval()
        self._model, self._tokenizer = model, tokenizer

    def fill(self, slots: Sequence[Slot]) -> list[list[str]]:
        import torch

        if self._model is None:
            raise RuntimeError("load() was not called")
        tokenizer, model = self._tokenizer, self._model
        special = set(tokenizer.all_special_ids)
        max_length = min(getattr(tokenizer, "model_max_length", 512) or 512, 512)
        out: list[list[str]] = []
        for begin in range(0, len(slots), self.batch_size):
            batch = slots[begin : begin + self.batch_size]
            enc = tokenizer(
                [slot.masked(tokenizer.mask_token) for slot in batch],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            ).to(model.device)
            with torch.inference_mode():
                logits = model(**enc).logits
            for row in range(len(batch)):
                where = (enc["input_ids"][row] == tokenizer.mask_token_id).nonzero()
                if len(where) == 0:  # the mask fell beyond the model's maximum length
                    out.append([])
                    continue
                ranked = logits[row, int(where[0, 0])].topk(self.search).indices.tolist()
                proposals: list[str] = []
                for token_id in ranked:
                    if token_id in special:
                        continue
                    word = clean_fill(tokenizer.decode([token_id]))
                    if word is not None and word not in proposals:
                        proposals.append(word)
                        if len(proposals) == self.candidates:
                            break
                out.append(proposals)
        return out


@register_filler("neighbour")
class NeighbourFiller(Filler):
    """Corpus nouns nearest to the masked noun (excluding the noun itself) by embedding cosine."""

    needs_vocabulary = True

    def __init__(
        self, model: str = "embedded-minilm", candidates: int = 5, batch_size: int = 64
    ) -> None:
        _positive("neighbour", "candidates", candidates)
        _positive("neighbour", "batch_size", batch_size)
        self.model_name = model
        self.candidates = candidates
        self.batch_size = batch_size
        self._encoder: Any = None
        self._words: list[str] = []
        self._tags: Any = None
        self._matrix: Any = None

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model_name, "candidates": self.candidates}

    def _encode(self, texts: Sequence[str]) -> Any:
        return self._encoder.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    def load(self, vocabulary: Sequence[tuple[str, str]]) -> None:
        import numpy as np

        if self._encoder is None:
            from sentence_transformers import SentenceTransformer

            from persona_align.metrics.base import Unavailable
            from persona_align.metrics.loading import pretrained_source

            try:
                location, local_only = pretrained_source(self.model_name)
            except Unavailable as err:
                raise InputError(None, f"SBS filler 'neighbour': {err}") from None
            try:
                self._encoder = SentenceTransformer(
                    location, local_files_only=local_only, device=devices.target("neighbour filler")
                )
            except (OSError, ValueError) as err:
                raise _unloadable("neighbour", self.model_name, err) from None
        self._words = [word for word, _ in vocabulary]
        self._tags = np.array([tag for _, tag in vocabulary])
        self._matrix = self._encode(self._words) if self._words else None

    def fill(self, slots: Sequence[Slot]) -> list[list[str]]:
        import numpy as np

        if self._encoder is None:
            raise RuntimeError("load() was not called")
        if self._matrix is None or not slots:
            return [[] for _ in slots]
        nouns = list(dict.fromkeys(slot.noun for slot in slots))
        row = {noun: i for i, noun in enumerate(nouns)}
        sims = self._encode(nouns) @ self._matrix.T
        out = []
        noun_lower = [word.lower() for word in self._words]
        for slot in slots:
            order = np.argsort(-sims[row[slot.noun]], kind="stable")
            others = order[np.array([noun_lower[i] != slot.noun.lower() for i in order])]
            same = others[self._tags[others] == slot.tag]
            ranked = same if len(same) else others  # no other noun of its tag: any noun
            out.append([self._words[i] for i in ranked[: self.candidates]])
        return out


@register_filler("chat")
class ChatFiller(Filler):
    """A chat model fills the blank; beam search gives ``candidates`` ranked answers."""

    def __init__(
        self,
        model: str = "embedded",
        candidates: int = 2,
        batch_size: int = 8,
        max_new_tokens: int = 8,
        dtype: str = "auto",
    ) -> None:
        for key, value in (
            ("candidates", candidates),
            ("batch_size", batch_size),
            ("max_new_tokens", max_new_tokens),
        ):
            _positive("chat", key, value)
        if dtype not in DTYPES:
            raise InputError(None, f"SBS filler 'chat': dtype must be one of {', '.join(DTYPES)}")
        resolve(model)  # an unknown model fails now, with one line
        self.model_name = model
        self.candidates = candidates
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.dtype = dtype
        self._model: Any = None
        self._tokenizer: Any = None

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model_name, "candidates": self.candidates}

    @staticmethod
    def prompt(slot: Slot) -> str:
        return (
            "Replace ___ in the sentence below with one noun that fits.\n"
            f"Sentence: {slot.masked('___')}\n"
            "Answer with the noun only."
        )

    def load(self, vocabulary: Sequence[tuple[str, str]]) -> None:
        if self._model is None:
            self._model, self._tokenizer = load_causal_lm(self.model_name, self.dtype)
            self._tokenizer.padding_side = "left"
            if self._tokenizer.pad_token is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token

    def fill(self, slots: Sequence[Slot]) -> list[list[str]]:
        import torch

        from persona_align.prompting import render_chat
        from persona_align.records import Message

        if self._model is None:
            raise RuntimeError("load() was not called")
        tokenizer, model = self._tokenizer, self._model
        out: list[list[str]] = []
        for begin in range(0, len(slots), self.batch_size):
            batch = slots[begin : begin + self.batch_size]
            texts = [
                render_chat(tokenizer, [Message(role="user", content=self.prompt(s))])
                for s in batch
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            with torch.inference_mode():
                generated = model.generate(
                    **enc,
                    max_new_tokens=self.max_new_tokens,
                    num_beams=self.candidates,
                    num_return_sequences=self.candidates,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )
            answers = tokenizer.batch_decode(
                generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for row in range(len(batch)):
                proposals: list[str] = []
                for answer in answers[row * self.candidates : (row + 1) * self.candidates]:
                    word = clean_fill(answer)
                    if word is not None and word not in proposals:
                        proposals.append(word)
                out.append(proposals)
        return out
