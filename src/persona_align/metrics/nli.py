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

from persona_align.data.nli import LABELS, Label, NLIPair, normalise_label
from persona_align.errors import InputError
from persona_align.metrics.base import Unavailable
from persona_align.models import resolve

EMBEDDED_NLI = "embedded-nli"
NLI_DTYPES = ("float32", "bfloat16")
Pair = tuple[str, str]


def embedded_nli_dir() -> Path:
    """The adapter folder shipped inside the package."""
    return Path(str(resources.files("persona_align") / "assets" / "nli-minilm"))


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


# Results kept per loaded model; a pair is three floats, so this holds a few MB.
MEMO_SIZE = 100_000
_SHARED: dict[tuple[str, str, int], NLIModel] = {}


def shared_nli(name: str = EMBEDDED_NLI, dtype: str = "float32", batch_size: int = 64) -> NLIModel:
    """One NLIModel per (name, dtype, batch size) in a process: C and UE then load the model
    once, and UE's (persona, reply) pairs — the very pairs C scores — come from its memo."""
    key = (name, dtype, batch_size)
    if key not in _SHARED:
        _SHARED[key] = NLIModel(name, dtype=dtype, batch_size=batch_size)
    return _SHARED[key]


class NLIModel:
    """Batched 3-way NLI: ``predict([(premise, hypothesis), ...])`` → labels.

    Identical pairs are scored once (persona sentences repeat across the candidates of a
    dialogue), and the unique pairs run in batches of similar length so little is padding.
    ``dtype="bfloat16"`` casts the weights: faster only where bf16 matmuls are native (AMX,
    AVX512-BF16, GPUs); on an AVX2-only CPU it is several times slower than float32.
    """

    def __init__(
        self,
        name: str = EMBEDDED_NLI,
        *,
        dtype: str = "float32",
        batch_size: int = 64,
    ) -> None:
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
        self._order: list[int] = []
        # recent results by pair: C and UE ask for the same (persona, reply) pairs
        self._memo: OrderedDict[Pair, np.ndarray] = OrderedDict()
        self.forwarded = 0  # pairs that went through the model (the rest came from the memo)

    def _locate(self) -> tuple[str, bool]:
        """(what to load, whether it is a PEFT adapter folder); Unavailable when unresolvable."""
        if self.name == EMBEDDED_NLI:
            folder = embedded_nli_dir()
            if not (folder / "adapter_config.json").is_file():
                raise Unavailable(
                    f"the embedded NLI adapter is missing from the package ({folder})"
                )
            return str(folder), True
        try:
            resolved = resolve(self.name)
        except InputError as err:
            raise Unavailable(str(err)) from None
        adapter = Path(resolved.location, "adapter_config.json")
        return resolved.location, resolved.kind == "local" and adapter.is_file()

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
                    model = AutoModelForSequenceClassification.from_pretrained(location)
                    tokenizer = AutoTokenizer.from_pretrained(location)
        except Unavailable:
            raise
        except (OSError, ValueError, KeyError, InputError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise Unavailable(f"cannot load NLI model {self.name!r}: {first}") from None
        self._order = label_order(model.config.id2label)
        model.eval()
        if self.dtype == "bfloat16":
            model.to(torch.bfloat16)
        self.model, self.tokenizer = model, tokenizer

    def probabilities(
        self, pairs: Sequence[Pair], on_batch: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Rows of p(entailment), p(neutral), p(contradiction), one per pair (float32).

        ``on_batch(n)`` is called after each batch with the number of unique pairs it held.
        """
        self.load()
        if not pairs:
            return np.zeros((0, len(LABELS)), dtype=np.float32)
        unique = [p for p in dict.fromkeys(pairs) if p not in self._memo]
        fresh = dict(zip(unique, self._forward(unique, on_batch), strict=True)) if unique else {}
        found = np.stack([fresh[p] if p in fresh else self._memo[p] for p in pairs])
        self._memo.update(fresh)
        while len(self._memo) > MEMO_SIZE:
            self._memo.popitem(last=False)
        return found

    def _forward(self, unique: list[Pair], on_batch: Callable[[int], None] | None) -> np.ndarray:
        import torch

        encoded = self.tokenizer(
            [premise for premise, _ in unique],
            [hypothesis for _, hypothesis in unique],
            truncation=True,
        )
        lengths = [len(ids) for ids in encoded["input_ids"]]
        by_length = sorted(range(len(unique)), key=lengths.__getitem__)
        found = np.zeros((len(unique), len(LABELS)), dtype=np.float32)
        order = torch.tensor(self._order)
        with torch.inference_mode():
            for start in range(0, len(by_length), self.batch_size):
                rows = by_length[start : start + self.batch_size]
                batch = self.tokenizer.pad(
                    [{key: encoded[key][i] for key in encoded} for i in rows], return_tensors="pt"
                )
                logits = self.model(**batch).logits.float()
                found[rows] = torch.softmax(logits[:, order], dim=-1).numpy()
                if on_batch is not None:
                    on_batch(len(rows))
        self.forwarded += len(unique)
        return found

    def predict(
        self, pairs: Sequence[Pair], on_batch: Callable[[int], None] | None = None
    ) -> list[Label]:
        """The most probable label of each (premise, hypothesis) pair."""
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
    model = AutoModelForSequenceClassification.from_pretrained(base, config=config)
    model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(folder if has_tokenizer else base)
    return model, tokenizer
