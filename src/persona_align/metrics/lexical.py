"""Word-overlap metrics against the gold turn (BLEU, ROUGE, METEOR, F1) and diversity (Dist-n).

Every metric here sees the same tokens, from :func:`tokenize`:

- the text is NFKC-normalised (full-width forms become ASCII) and lower-cased;
- runs of CJK ideographs are segmented into words with jieba, so Chinese is compared word by
  word, not character by character;
- everything else is split into words (letters/digits, keeping inner apostrophes: ``don't``)
  and single punctuation marks, each its own token.

F1 additionally follows ParlAI: punctuation and symbols become spaces and the articles a/an/the
are dropped before tokenising. nltk and rouge-score are imported on first use: importing nltk
takes seconds, and the registry imports this module on every command.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from abc import abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any, ClassVar

from persona_align.metrics.base import Metric, ScoreItem, register_metric

_CJK_RUN = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]+)")
_WORD_OR_MARK = re.compile(r"\w+(?:['\u2019]\w+)*|[^\w\s]")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


@cache
def _jieba() -> Any:
    """jieba's default segmenter, imported (and its dictionary loaded) only for CJK text."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def tokenize(text: str) -> list[str]:
    """The tokens every lexical metric uses: jieba words for CJK runs, words and marks elsewhere."""
    tokens: list[str] = []
    for i, part in enumerate(_CJK_RUN.split(unicodedata.normalize("NFKC", text).lower())):
        if i % 2:  # re.split with a group puts the CJK runs at odd positions
            tokens.extend(w for w in _jieba().lcut(part) if w.strip())
        else:
            tokens.extend(_WORD_OR_MARK.findall(part))
    return tokens


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct(tokens: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams of one token sequence (0.0 when it has no n-gram)."""
    grams = ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else 0.0


def corpus_distinct(responses: Iterable[str], n: int) -> float:
    """System-level Dist-n: distinct n-grams over all responses / all their n-grams.

    N-grams never span two responses. A system that repeats itself across dialogues scores low
    here even when each reply alone is varied, which the per-reply mean cannot show.
    """
    seen: set[tuple[str, ...]] = set()
    total = 0
    for response in responses:
        grams = ngrams(tokenize(response), n)
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def parlai_normalize(text: str) -> str:
    """ParlAI's answer normalisation: lower-case, punctuation → space, no articles, one space.

    ParlAI strips ASCII punctuation; here every Unicode punctuation or symbol character goes, so
    Chinese full-width marks are stripped too.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return " ".join(_ARTICLES.sub(" ", text).split())


class _Overlap(Metric):
    """A reference-based metric: compares the reply with the gold turn, 0.0 for failures."""

    failure_value = 0.0
    needs_reference = True

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        return [self.compare(item.response, item.dialogue.reference or "") for item in items]

    @abstractmethod
    def compare(self, response: str, reference: str) -> float:
        """The value for one reply; an empty reply or reference must give 0.0."""


class _Bleu(_Overlap):
    """Sentence BLEU with cumulative weights 1/n for 1..n-grams and nltk smoothing method1.

    method1 replaces a zero n-gram match count by epsilon = 0.1, so a short reply with no
    matching 4-gram does not zero its BLEU-4 (the common choice for single dialogue turns).
    """

    order: ClassVar[int]

    def compare(self, response: str, reference: str) -> float:
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

        return float(
            sentence_bleu(
                [tokenize(reference)],
                tokenize(response),
                weights=(1 / self.order,) * self.order,
                smoothing_function=SmoothingFunction().method1,
            )
        )


@register_metric("bleu-1")
class Bleu1(_Bleu):
    description = "sentence BLEU-1 vs the gold turn (nltk, smoothing method1)"
    order = 1


@register_metric("bleu-2")
class Bleu2(_Bleu):
    description = "sentence BLEU-2, cumulative 1-2-gram weights (nltk, smoothing method1)"
    order = 2


@register_metric("bleu-4")
class Bleu4(_Bleu):
    description = "sentence BLEU-4, cumulative 1-4-gram weights (nltk, smoothing method1)"
    order = 4


class _SharedTokenizer:
    """rouge-score's tokenizer interface around :func:`tokenize` (its own drops CJK text)."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text)


class _Rouge(_Overlap):
    """ROUGE F-measure from rouge-score, on the shared tokens (so no stemming)."""

    rouge_type: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        from rouge_score.rouge_scorer import RougeScorer

        self._scorer = RougeScorer([self.rouge_type], tokenizer=_SharedTokenizer())

    def compare(self, response: str, reference: str) -> float:
        return float(self._scorer.score(reference, response)[self.rouge_type].fmeasure)


@register_metric("rouge-1")
class Rouge1(_Rouge):
    description = "ROUGE-1 F-measure vs the gold turn (rouge-score)"
    rouge_type = "rouge1"


@register_metric("rouge-2")
class Rouge2(_Rouge):
    description = "ROUGE-2 F-measure vs the gold turn (rouge-score)"
    rouge_type = "rouge2"


@register_metric("rouge-l")
class RougeL(_Rouge):
    description = "ROUGE-L (longest common subsequence) F-measure vs the gold turn (rouge-score)"
    rouge_type = "rougeL"


class _NoSynonyms:
    """Stands in for nltk's WordNet reader: WordNet data cannot be downloaded here."""

    def synsets(self, word: str) -> list[Any]:
        return []


@register_metric("meteor")
class Meteor(_Overlap):
    """nltk METEOR with exact and Porter-stem matching only (alpha 0.9, beta 3, gamma 0.5).

    Without WordNet the synonym stage matches nothing, so values are at or below standard
    METEOR (equal when no synonym pair would have matched).
    """

    description = "METEOR (nltk) with exact + stem matching, no WordNet synonyms"

    def compare(self, response: str, reference: str) -> float:
        from nltk.translate.meteor_score import meteor_score

        return float(meteor_score([tokenize(reference)], tokenize(response), wordnet=_NoSynonyms()))


@register_metric("f1")
class UnigramF1(_Overlap):
    """ParlAI's unigram F1: bag-of-words overlap after ParlAI's normalisation."""

    description = "unigram F1 vs the gold turn, ParlAI normalisation (no punctuation, articles)"

    def compare(self, response: str, reference: str) -> float:
        predicted = tokenize(parlai_normalize(response))
        gold = tokenize(parlai_normalize(reference))
        same = sum((Counter(predicted) & Counter(gold)).values())
        if same == 0:
            return 0.0
        precision, recall = same / len(predicted), same / len(gold)
        return 2 * precision * recall / (precision + recall)


class _Distinct(Metric):
    """Reference-free diversity of one reply; see :func:`corpus_distinct` for a system's."""

    failure_value = 0.0
    order: ClassVar[int]

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        return [distinct(tokenize(item.response), self.order) for item in items]


@register_metric("dist-1")
class Dist1(_Distinct):
    description = "distinct unigrams / all unigrams within the reply"
    order = 1


@register_metric("dist-2")
class Dist2(_Distinct):
    description = "distinct bigrams / all bigrams within the reply"
    order = 2
