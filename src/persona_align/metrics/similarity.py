"""SBS's semantic similarity score: cosine of sentence embeddings of the reply and the gold turn.

SBS (Saggar et al., ECAI 2025) scores a response by its embedding similarity to a reference
response; here the reference is the dataset's gold turn. Embeddings come from a
sentence-transformers model (default the embedded all-MiniLM-L6-v2) and are L2-normalised, so
the dot product is the cosine, in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from persona_align import devices
from persona_align.errors import InputError
from persona_align.metrics.base import Metric, ScoreItem, Unavailable, register_metric
from persona_align.models import model_version, resolve


@register_metric("sbs-sim")
class SBSSimilarity(Metric):
    """Each distinct text is embedded once per batch: gold turns repeat across candidates."""

    description = "SBS semantic similarity: embedding cosine of reply and gold turn (MiniLM)"
    failure_value = 0.0
    needs_reference = True

    def __init__(self, model: str = "embedded-minilm", batch_size: int = 64) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(
                None, f"metric 'sbs-sim': batch_size must be a positive integer, got {batch_size!r}"
            )
        self._model_name = model
        self.batch_size = batch_size
        self._encoder: Any = None
        self._version: str | None = None

    @property
    def model(self) -> str | None:
        return self._model_name

    def settings(self) -> dict[str, Any]:
        return super().settings() | {"version": self._version}

    def load(self) -> None:
        try:
            resolved = resolve(self._model_name)
        except InputError as err:
            raise Unavailable(err.message) from None
        from sentence_transformers import SentenceTransformer

        try:
            self._encoder = SentenceTransformer(
                resolved.location,
                local_files_only=resolved.kind != "hub",
                device=devices.target("similarity encoder"),
            )
        except (OSError, ValueError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise Unavailable(f"cannot load model {self._model_name!r}: {reason}") from None
        self._version = model_version(self._model_name)

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        if self._encoder is None:
            raise Unavailable("load() was not called")
        pairs = [(item.response.strip(), (item.dialogue.reference or "").strip()) for item in items]
        texts = list(dict.fromkeys(text for pair in pairs if all(pair) for text in pair))
        if not texts:
            return [0.0] * len(items)
        row = {text: i for i, text in enumerate(texts)}
        embeddings = self._encoder.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        # An empty side says nothing to compare: 0.0, as in the other reference metrics.
        return [
            float(embeddings[row[response]] @ embeddings[row[reference]])
            if response and reference
            else 0.0
            for response, reference in pairs
        ]
