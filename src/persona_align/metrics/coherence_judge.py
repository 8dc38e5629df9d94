"""The embedded coherence judge: sentence embeddings of the reply and its dialogue, and a small
trained head.

A reply is embedded (all-MiniLM-L6-v2, trained contrastively on question/answer and
comment/reply pairs, so "this answers that" is already close in its space) together with the
turn it answers, the earlier history, the responder's own previous turn and the persona. The
head reads the reply-question interaction, their cosines, and a few shape features that
embeddings miss (repeated n-grams of a degenerate loop, a cut-off ending, first- and
second-person share for a reply spoken in the wrong role). It is trained on real next turns
against pseudo-negatives (``training/judge.py``), as UniEval was, and checked against readers'
labels. Turn embeddings shared by several replies of one dialogue are computed once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from persona_align import devices
from persona_align.metrics.base import Unavailable
from persona_align.records import Turn

WORD = re.compile(r"[\w']+")
FIRST = {"i", "i'm", "im", "i've", "ive", "i'd", "id", "i'll", "me", "my", "mine", "myself"}
SECOND = {"you", "you're", "youre", "you've", "your", "yours", "yourself", "you'd", "you'll"}
EMBED_DIM = 384
SHAPE_FEATURES = 9
COSINES = 4


@dataclass(frozen=True)
class CoherenceInput:
    """What the judge reads of one item: the reply and its dialogue's parts."""

    reply: str
    question: str  # the turn being answered
    history: str  # the turns before it, newest kept
    own: str  # the responder's own previous turn ("" if none)
    persona: str


def coherence_input(context: Sequence[Turn], reply: str, persona: Sequence[str]) -> CoherenceInput:
    last = context[-1]
    own = next((t.text for t in reversed(context) if t.speaker != last.speaker), "")
    history = " ".join(t.text for t in context[-4:-1])
    return CoherenceInput(reply, last.text, history, own, " ".join(persona))


def shape_features(reply: str, question: str) -> list[float]:
    """Shape of the reply that embeddings blur: loops, cut-off endings, role, echo."""
    words = [w.lower() for w in WORD.findall(reply)]
    n = len(words)
    grams = [tuple(words[i : i + 3]) for i in range(max(0, n - 2))]
    repeated = 1 - len(set(grams)) / len(grams) if grams else 0.0
    distinct1 = len(set(words)) / n if n else 0.0
    pairs = [tuple(words[i : i + 2]) for i in range(max(0, n - 1))]
    distinct2 = len(set(pairs)) / len(pairs) if pairs else 0.0
    asked = {w.lower() for w in WORD.findall(question)}
    overlap = len(set(words) & asked) / len(set(words) | asked) if words or asked else 0.0
    ends = reply.rstrip().rstrip("\"')]}").endswith((".", "!", "?", "…"))
    return [
        repeated, distinct1, distinct2, float(np.log1p(n)) / 5, float(ends),
        sum(w in FIRST for w in words) / n if n else 0.0,
        sum(w in SECOND for w in words) / n if n else 0.0,
        overlap, float(reply.strip().lower() == question.strip().lower()),
    ]  # fmt: skip


# The heads averaged by the judge and the feature columns each reads: one over everything (the
# reply-question interaction vector included), one over the scalar similarities and shape
# features only, which carries over better to dialogues unlike the training data.
HEADS = {
    "all": list(range(EMBED_DIM + COSINES + SHAPE_FEATURES)),
    "scalars": list(range(EMBED_DIM, EMBED_DIM + COSINES + SHAPE_FEATURES)),
}


class CoherenceHead:
    """Small MLPs over the features, averaged (numpy at inference; trained with torch).

    ``head.npz`` keys are ``MEMBER/PARAM``; a member is a ``HEADS`` name, optionally with a seed
    index (``all/0/w1``): members trained from several seeds average out the seed's noise.
    """

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.members: dict[str, dict[str, np.ndarray]] = {}
        for key, value in weights.items():
            member, _, param = key.rpartition("/")
            self.members.setdefault(member, {})[param] = value
        unknown = [m for m in self.members if m.split("/")[0] not in HEADS]
        if unknown or not self.members:
            raise Unavailable(f"the coherence head has an unknown member {(unknown or [''])[0]!r}")

    def __call__(self, features: np.ndarray) -> np.ndarray:
        found = []
        for member, w in self.members.items():
            x = features[:, HEADS[member.split("/")[0]]]
            hidden = np.maximum(0.0, (x - w["mean"]) / w["scale"] @ w["w1"] + w["b1"])
            logits = hidden @ w["w2"] + w["b2"]
            found.append(1 / (1 + np.exp(-logits[:, 0])))
        return np.mean(found, axis=0)


def features(inputs: Sequence[CoherenceInput], encode: Any) -> np.ndarray:
    """One feature row per input; ``encode(texts) -> unit vectors`` (duplicates run once)."""
    texts = list(dict.fromkeys(t for i in inputs for t in (i.reply, i.question, i.history,
                                                           i.own, i.persona) if t))  # fmt: skip
    vectors = dict(zip(texts, encode(texts), strict=True)) if texts else {}
    zero = np.zeros(EMBED_DIM, dtype=np.float32)
    rows = []
    for i in inputs:
        r, q, h, o, p = (vectors.get(t, zero) for t in (i.reply, i.question, i.history, i.own,
                                                         i.persona))  # fmt: skip
        cosines = [float(r @ q), float(r @ h), float(r @ o), float(r @ p)]
        rows.append(np.concatenate([r * q, cosines, shape_features(i.reply, i.question)]))
    return np.asarray(rows, dtype=np.float32)


class CoherenceJudge:
    """Loads a judge folder (``judge.json`` with ``task: coh``, ``head.npz``) and its encoder."""

    def __init__(self, folder: Path, batch_size: int = 64) -> None:
        self.folder = folder
        self.batch_size = batch_size
        self.spec: dict[str, Any] = {}
        self.head: CoherenceHead | None = None
        self._encoder: Any = None

    def load(self) -> None:
        if self.head is not None:
            return
        spec_file = self.folder / "judge.json"
        if not spec_file.is_file():
            raise Unavailable(f"{self.folder} has no judge.json: not a judge folder")
        spec = json.loads(spec_file.read_text())
        if spec.get("task") != "coh":
            raise Unavailable(f"{self.folder} is not a coherence judge (task {spec.get('task')!r})")
        with np.load(self.folder / "head.npz") as data:
            self.head = CoherenceHead({key: data[key] for key in data.files})
        self.spec = spec
        self._encoder = load_encoder(spec.get("encoder", "embedded-minilm"))

    def encode(self, texts: list[str]) -> np.ndarray:
        return self._encoder.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)  # fmt: skip

    def probabilities(self, inputs: Sequence[CoherenceInput]) -> np.ndarray:
        """p(coherent) per input."""
        self.load()
        assert self.head is not None
        if not inputs:
            return np.zeros(0, dtype=np.float32)
        return self.head(features(inputs, self.encode))


def load_encoder(name: str) -> Any:
    """The sentence encoder the features come from, on the policy's device."""
    from sentence_transformers import SentenceTransformer

    from persona_align.errors import InputError
    from persona_align.models import resolve

    try:
        resolved = resolve(name)
    except InputError as err:
        raise Unavailable(err.message) from None
    try:
        return SentenceTransformer(
            resolved.location,
            local_files_only=resolved.kind != "hub",
            device=devices.target("coherence encoder"),
        )
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise Unavailable(f"cannot load encoder {name!r}: {reason}") from None
