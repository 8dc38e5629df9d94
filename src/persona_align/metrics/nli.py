"""The NLI cross-encoder behind the C and UE metrics.

Any Hugging Face sequence-classification NLI model works: a local directory, a hub id, a PEFT
adapter directory (its base named in ``adapter_config.json``), or ``embedded-nli``, the LoRA
adapter shipped in ``persona_align/assets/nli-minilm`` over the embedded all-MiniLM-L6-v2.
Which output means what is read from ``config.id2label``: NLI checkpoints disagree on the
order, and a wrong guess turns every contradiction into an entailment without any error.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from persona_align import devices
from persona_align.data.nli import LABELS, Label, NLIPair, normalise_label
from persona_align.errors import InputError
from persona_align.metrics.base import Unavailable
from persona_align.models import resolve, tree_digest

EMBEDDED_NLI = "embedded-nli"
# Pair classifiers shipped inside the package: name → folder under persona_align/assets.
EMBEDDED_CLASSIFIERS = {
    EMBEDDED_NLI: "nli-minilm",
    "embedded-c-judge": "judge-c",
    "embedded-coh-judge": "judge-coh",
}
NLI_DTYPES = ("auto", "float32", "bfloat16")  # auto: devices.default_dtype()
Pair = tuple[str, str]


def embedded_dir(name: str = EMBEDDED_NLI) -> Path:
    """The adapter folder of a shipped classifier."""
    return Path(str(resources.files("persona_align") / "assets" / EMBEDDED_CLASSIFIERS[name]))


def embedded_nli_dir() -> Path:
    """The NLI adapter folder shipped inside the package."""
    return embedded_dir(EMBEDDED_NLI)


def label_order(id2label: dict[Any, Any]) -> list[int]:
    """Output index of entailment, neutral and contradiction, from the model's own label names."""
    found: dict[Label, int] = {}
    for index, name in id2label.items():
        label = normalise_label(str(name))
        if label is None:
            raise Unavailable(
                f"output {index} is labelled {name!r} in config.id2label, which is not an NLI "
                "label (entailment/neutral/contradiction); the label order cannot be known"
            )
        if label in found:
            raise Unavailable(f"config.id2label names {label} twice")
        found[label] = int(index)
    missing = [label for label in LABELS if label not in found]
    if missing:
        raise Unavailable(f"config.id2label has no {missing[0]} output: not a 3-way NLI model")
    return [found[label] for label in LABELS]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide loading bars, the "newly initialized weights" report (an adapter or training sets
    the head) and library deprecation warnings: none is actionable by our user."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", "Could not find a config file", UserWarning)
            yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


# Results kept per loaded model; a pair is a few floats, so this holds a few MB.
MEMO_SIZE = 100_000
_SHARED: dict[tuple[str, str, int], PairClassifier] = {}


def shared_nli(name: str = EMBEDDED_NLI, dtype: str = "auto", batch_size: int = 64) -> NLIModel:
    """One NLIModel per (name, dtype, batch size) in a process: C and UE then load the model
    once, and UE's (persona, reply) pairs — the very pairs C scores — come from its memo."""
    key = (name, dtype, batch_size)
    if key not in _SHARED:
        _SHARED[key] = NLIModel(name, dtype=dtype, batch_size=batch_size)
    found = _SHARED[key]
    assert isinstance(found, NLIModel)
    return found


class PairClassifier:
    """A batched sequence-pair classifier: ``probabilities([(a, b), ...])`` → one row per pair.

    Identical pairs are scored once (persona sentences and personas repeat across the
    candidates of a dialogue), and the unique pairs run in batches of similar length so little
    is padding. Columns follow ``labels`` (the model's own ``config.id2label`` order unless a
    subclass fixes another). A ``judge.json`` beside the weights (our judges) describes how
    inputs are formatted; ``spec`` holds it. ``dtype="bfloat16"`` casts the weights: faster only
    where bf16 matmuls are native (AMX, AVX512-BF16, GPUs).
    """

    kind = "pair-classifier"

    def __init__(self, name: str, *, dtype: str = "auto", batch_size: int = 64) -> None:
        if dtype not in NLI_DTYPES:
            raise InputError(
                None, f"NLI dtype must be one of {', '.join(NLI_DTYPES)}, got {dtype!r}"
            )
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(None, f"NLI batch_size must be a positive integer, got {batch_size!r}")
        self.name = name
        self.dtype = dtype
        self.batch_size = batch_size
        self.model: Any = None
        self.tokenizer: Any = None
        self.labels: tuple[str, ...] = ()
        self.spec: dict[str, Any] = {}
        self.version: str | None = None
        self.max_length: int | None = None
        self._order: list[int] = []
        # recent results by pair: C and UE ask for the same (persona, reply) pairs
        self._memo: OrderedDict[Pair, np.ndarray] = OrderedDict()
        self.forwarded = 0  # pairs that went through the model (the rest came from the memo)

    def _locate(self) -> tuple[str, bool]:
        """(what to load, whether it is a PEFT adapter folder); Unavailable when unresolvable."""
        if self.name in EMBEDDED_CLASSIFIERS:
            folder = embedded_dir(self.name)
            if not (folder / "adapter_config.json").is_file():
                raise Unavailable(f"the embedded model {self.name!r} is missing ({folder})")
            return str(folder), True
        try:
            resolved = resolve(self.name)
        except InputError as err:
            raise Unavailable(str(err)) from None
        adapter = Path(resolved.location, "adapter_config.json")
        return resolved.location, resolved.kind == "local" and adapter.is_file()

    def _label_columns(self, id2label: dict[Any, Any]) -> tuple[tuple[str, ...], list[int]]:
        """(label names, the output index of each): the model's own order here."""
        order = sorted(int(i) for i in id2label)
        return tuple(str(id2label.get(i, id2label.get(str(i)))) for i in order), order

    def load(self) -> None:
        """Load once; raise Unavailable with the reason when the model cannot be had here."""
        if self.model is not None:
            return
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        location, adapter = self._locate()
        try:
            with quiet_transformers():
                if adapter:
                    model, tokenizer = _load_adapter(Path(location))
                else:
                    model = AutoModelForSequenceClassification.from_pretrained(
                        location, **devices.load_kwargs()
                    )
                    tokenizer = AutoTokenizer.from_pretrained(location)
        except Unavailable:
            raise
        except (OSError, ValueError, KeyError, InputError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise Unavailable(f"cannot load {self.kind} model {self.name!r}: {first}") from None
        self.labels, self._order = self._label_columns(model.config.id2label)
        spec = Path(location, "judge.json")
        self.spec = json.loads(spec.read_text()) if spec.is_file() else {}
        self.max_length = self.spec.get("max_length")
        root = Path(location)
        self.version = tree_digest(root) if root.is_dir() else location
        devices.place(model, self.kind).eval()
        if devices.dtype_for(self.dtype) == "bfloat16":
            model.to(torch.bfloat16)
        self.model, self.tokenizer = model, tokenizer

    def probabilities(
        self, pairs: Sequence[Pair], on_batch: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Rows of label probabilities (columns in ``labels`` order), one per pair (float32).

        ``on_batch(n)`` is called after each batch with the number of unique pairs it held.
        """
        self.load()
        if not pairs:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        unique = [p for p in dict.fromkeys(pairs) if p not in self._memo]
        fresh = dict(zip(unique, self._forward(unique, on_batch), strict=True)) if unique else {}
        found = np.stack([fresh[p] if p in fresh else self._memo[p] for p in pairs])
        self._memo.update(fresh)
        while len(self._memo) > MEMO_SIZE:
            self._memo.popitem(last=False)
        return found

    def _forward(self, unique: list[Pair], on_batch: Callable[[int], None] | None) -> np.ndarray:
        import torch

        limit = {"max_length": self.max_length} if self.max_length else {}
        encoded = self.tokenizer(
            [premise for premise, _ in unique],
            [hypothesis for _, hypothesis in unique],
            truncation=True,
            **limit,
        )
        lengths = [len(ids) for ids in encoded["input_ids"]]
        by_length = sorted(range(len(unique)), key=lengths.__getitem__)
        found = np.zeros((len(unique), len(self.labels)), dtype=np.float32)
        device = self.model.device
        order = torch.tensor(self._order, device=device)
        with torch.inference_mode():
            for start in range(0, len(by_length), self.batch_size):
                rows = by_length[start : start + self.batch_size]
                batch = self.tokenizer.pad(
                    [{key: encoded[key][i] for key in encoded} for i in rows], return_tensors="pt"
                ).to(device)
                logits = self.model(**batch).logits.float()
                found[rows] = torch.softmax(logits[:, order], dim=-1).cpu().numpy()
                if on_batch is not None:
                    on_batch(len(rows))
        self.forwarded += len(unique)
        return found

    def predict(
        self, pairs: Sequence[Pair], on_batch: Callable[[int], None] | None = None
    ) -> list[str]:
        """The most probable label of each pair."""
        return [self.labels[i] for i in self.probabilities(pairs, on_batch).argmax(axis=1)]


class NLIModel(PairClassifier):
    """3-way NLI: columns are always entailment, neutral, contradiction, whatever order the
    checkpoint uses. Which output means what is read from ``config.id2label``."""

    kind = "NLI"

    def __init__(
        self, name: str = EMBEDDED_NLI, *, dtype: str = "auto", batch_size: int = 64
    ) -> None:
        super().__init__(name, dtype=dtype, batch_size=batch_size)

    def _label_columns(self, id2label: dict[Any, Any]) -> tuple[tuple[str, ...], list[int]]:
        return LABELS, label_order(id2label)

    def predict(  # type: ignore[override]
        self, pairs: Sequence[Pair], on_batch: Callable[[int], None] | None = None
    ) -> list[Label]:
        return [LABELS[i] for i in self.probabilities(pairs, on_batch).argmax(axis=1)]


@dataclass(frozen=True)
class NLIEvaluation:
    """Accuracy and confusion matrix (rows = gold, columns = predicted, in LABELS order)."""

    pairs: int
    accuracy: float
    confusion: list[list[int]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "accuracy": self.accuracy,
            "confusion": {"labels": list(LABELS), "gold_by_predicted": self.confusion},
        }


def evaluate_nli(
    model: NLIModel, pairs: Sequence[NLIPair], on_batch: Callable[[int], None] | None = None
) -> NLIEvaluation:
    """Score a labelled NLI set with ``model``."""
    predicted = model.predict([(p.premise, p.hypothesis) for p in pairs], on_batch)
    confusion = [[0] * len(LABELS) for _ in LABELS]
    for pair, label in zip(pairs, predicted, strict=True):
        confusion[LABELS.index(pair.label)][LABELS.index(label)] += 1
    correct = sum(confusion[i][i] for i in range(len(LABELS)))
    return NLIEvaluation(len(pairs), correct / len(pairs) if pairs else 0.0, confusion)


def _load_adapter(folder: Path) -> tuple[Any, Any]:
    """A PEFT adapter over its base model, merged for inference speed."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    base_name = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    if not base_name:
        raise Unavailable(f"{folder}/adapter_config.json does not name its base model")
    base = resolve(base_name).location
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, config=config, **devices.load_kwargs()
    )
    model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(folder if has_tokenizer else base)
    return model, tokenizer
