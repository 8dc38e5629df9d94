"""Train the NLI cross-encoder behind UE (and C's PersoBench protocol): LoRA over a small
encoder, small enough to ship (see ``training/cross_encoder.py``).

Training data: Dialogue NLI ``nli-train.txt`` plus the MNLI matched/mismatched-hard and
SNLI-hard sets. SICK is left out on purpose: its licence (CC BY-NC-SA) does not allow shipping
a model trained on it. DNLI ``nli-valid.txt`` is held out, de-duplicated and stripped of any
pair that is also in training.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from persona_align.data.nli import LABELS, NLIPair, read_nli
from persona_align.errors import InputError
from persona_align.metrics.nli import NLIModel, evaluate_nli
from persona_align.training.cross_encoder import (
    FitSettings,
    check_output,
    fit_pair_classifier,
    progress_bar,
    save_adapter,
)


@dataclass
class NLIData:
    train: list[NLIPair]
    valid: list[NLIPair]
    sources: dict[str, int] = field(default_factory=dict)


def _one(data_dir: Path, pattern: str, what: str) -> Path:
    found = sorted(data_dir.glob(f"**/{pattern}"))
    if not found:
        raise InputError(data_dir, f"no {what} ({pattern}) under this folder")
    return found[0]


def load_training_data(data_dir: str | Path) -> NLIData:
    """DNLI train + MNLI/SNLI hard for training; DNLI valid, cleaned, for evaluation."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(data_dir, "is not a directory")
    sources: dict[str, list[NLIPair]] = {
        "dnli-train": read_nli(_one(data_dir, "nli-train.txt", "DNLI training file"), "dnli")
    }
    mnli = sorted(p.parent for p in data_dir.glob("**/s1.test"))
    if not mnli:
        raise InputError(data_dir, "no MNLI-hard folder (s1.test, s2.test, labels.test) under it")
    for folder in mnli:
        sources[f"mnli-hard:{folder.name}"] = read_nli(folder, "mnli-hard")
    snli = _one(data_dir, "snli_1.0_test_hard.jsonl", "SNLI-hard file")
    sources["snli-hard"] = read_nli(snli, "snli-hard")
    train = list(dict.fromkeys(pair for pairs in sources.values() for pair in pairs))
    seen = {(p.premise, p.hypothesis) for p in train}
    valid: dict[tuple[str, str], NLIPair] = {}
    for pair in read_nli(_one(data_dir, "nli-valid.txt", "DNLI validation file"), "dnli"):
        key = (pair.premise, pair.hypothesis)
        if key not in seen:
            valid.setdefault(key, pair)
    counts = {name: len(pairs) for name, pairs in sources.items()}
    return NLIData(train, list(valid.values()), counts)


@dataclass
class NLITrainResult:
    base: str
    train_pairs: int
    valid_pairs: int
    steps: int
    seconds: float
    settings: dict[str, Any]
    sources: dict[str, int]
    valid: dict[str, Any] | None = None


def train_nli(
    out_dir: str | Path,
    *,
    data_dir: str | Path,
    base: str = "embedded-minilm",
    epochs: int = 2,
    lr: float = 1e-3,
    lora_r: int = 16,
    lora_alpha: int | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    train_norms: bool = True,
    bf16: bool = False,
    seed: int = 0,
    max_pairs: int | None = None,
    max_steps: int | None = None,
    evaluate: bool = True,
    progress: Any = None,
) -> NLITrainResult:
    """Fine-tune ``base`` for 3-way NLI with LoRA and save the adapter to ``out_dir``.

    Deterministic for a seed (and a thread count). ``max_pairs`` trains on a seeded sample,
    ``max_steps`` stops early (smoke tests). ``progress`` is a rich Console for a progress bar.
    The output folder appears only when complete; it replaces an existing one.
    """
    settings = FitSettings(
        base=base, epochs=epochs, lr=lr, lora_r=lora_r, lora_alpha=lora_alpha,
        batch_size=batch_size, max_length=max_length, train_norms=train_norms, bf16=bf16,
        seed=seed, max_steps=max_steps,
    )  # fmt: skip
    settings.check()
    if max_pairs is not None and max_pairs < 1:
        raise InputError(None, f"max_pairs must be at least 1, got {max_pairs}")
    out = Path(out_dir)
    check_output(out)
    data = load_training_data(data_dir)
    train = list(data.train)
    if max_pairs is not None and max_pairs < len(train):
        train = random.Random(seed).sample(train, max_pairs)
    model, _, config, losses, seconds = fit_pair_classifier(
        [(p.premise, p.hypothesis) for p in train],
        [LABELS.index(p.label) for p in train],
        LABELS,
        settings,
        progress=progress,
        what="training NLI",
    )
    result = NLITrainResult(
        base, len(train), len(data.valid), len(losses), round(seconds, 1),
        settings.as_dict() | {"max_pairs": max_pairs}, data.sources,
    )  # fmt: skip

    def finish(tmp: Path) -> None:
        if evaluate and data.valid:
            nli = NLIModel(str(tmp), batch_size=128)
            with progress_bar(progress, "evaluating", len(data.valid)) as advance:
                result.valid = evaluate_nli(nli, data.valid, advance).as_dict()
        (tmp / "training.json").write_text(json.dumps(asdict(result), indent=2) + "\n")

    save_adapter(out, model, config, finish)
    return result
