"""BERTScore F1 of the reply against the gold turn (the ``bert-score`` package).

PersoBench reports BERTScore with the package's English default, roberta-large at layer 17,
which needs the hub. Here the default is the embedded all-MiniLM-L6-v2 (``embedded-minilm``)
using its last layer, so the metric runs offline; set ``model: roberta-large`` and
``num_layers: 17`` to reproduce the package default where the hub (or a local copy) is reachable.
Values from different models or layers are not comparable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from persona_align import devices
from persona_align.errors import InputError
from persona_align.metrics.base import Metric, ScoreItem, Unavailable, register_metric
from persona_align.models import model_version, resolve
from persona_align.records import Dialogue


def _positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(
            None, f"metric 'bertscore': {name} must be a positive integer, got {value!r}"
        )


@register_metric("bertscore")
class BERTScore(Metric):
    """Greedy-matched token-embedding F1 (Zhang et al. 2020), no baseline rescaling.

    ``num_layers`` picks the hidden layer whose embeddings are matched (default: the model's
    last). With ``idf`` the token weights come from the gold turns of every dialogue seen by
    ``fit``, as ``bert_score.score`` derives them from the references it is given.
    """

    description = "BERTScore F1 vs the gold turn (bert-score; default model embedded-minilm)"
    failure_value = 0.0
    needs_reference = True

    def __init__(
        self,
        model: str = "embedded-minilm",
        num_layers: int | None = None,
        batch_size: int = 64,
        idf: bool = False,
    ) -> None:
        super().__init__()
        _positive("num_layers", num_layers)
        _positive("batch_size", batch_size)
        self._model_name = model
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.idf = bool(idf)
        self._idf_corpus: list[str] = []
        self._scorer: Any = None
        self._version: str | None = None

    @property
    def model(self) -> str | None:
        return self._model_name

    def settings(self) -> dict[str, Any]:
        idf: str | bool = False
        if self.idf:  # idf weights depend on the whole reference corpus, not just the item
            idf = hashlib.sha256("\n".join(self._idf_corpus).encode("utf-8")).hexdigest()
        return {
            "name": self.name,
            "model": self._model_name,
            "version": self._version,
            "num_layers": self.num_layers,
            "idf": idf,
        }

    def fit(self, dialogues: Sequence[Dialogue]) -> None:
        if self.idf:
            self._idf_corpus = [d.reference for d in dialogues if (d.reference or "").strip()]

    def load(self) -> None:
        try:
            location = resolve(self._model_name).location
        except InputError as err:
            raise Unavailable(err.message) from None
        if self.idf and not self._idf_corpus:
            raise Unavailable("idf weights need gold replies, and no dialogue has one")
        from bert_score import BERTScorer
        from transformers import AutoConfig

        try:
            depth = AutoConfig.from_pretrained(location).num_hidden_layers
        except (OSError, ValueError) as err:
            raise self._unloadable(err) from None
        if self.num_layers is None:
            self.num_layers = depth
        elif self.num_layers > depth:
            raise InputError(
                None,
                f"metric 'bertscore': num_layers {self.num_layers} exceeds the "
                f"{depth} layers of {self._model_name!r}",
            )
        try:
            self._scorer = BERTScorer(
                model_type=location,
                num_layers=self.num_layers,
                batch_size=self.batch_size,
                nthreads=0,  # idf counting in-process: no worker pool beside torch's threads
                device=devices.target("bertscore"),
                idf=self.idf,
                idf_sents=self._idf_corpus or None,
            )
        except (OSError, ValueError) as err:
            raise self._unloadable(err) from None
        self._version = model_version(self._model_name)

    def _unloadable(self, err: Exception) -> Unavailable:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return Unavailable(f"cannot load model {self._model_name!r}: {reason}")

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        if self._scorer is None:
            raise Unavailable("load() was not called")
        pairs = [(item.response.strip(), (item.dialogue.reference or "").strip()) for item in items]
        # bert-score cannot encode an empty text; an empty side has nothing to match: 0.0.
        todo = [i for i, (response, reference) in enumerate(pairs) if response and reference]
        values: list[float | None] = [0.0] * len(items)
        if todo:
            _, _, f1 = self._scorer.score(
                [pairs[i][0] for i in todo],
                [pairs[i][1] for i in todo],
                batch_size=self.batch_size,
            )
            for i, value in zip(todo, f1.tolist(), strict=True):
                values[i] = float(value)
        return values
