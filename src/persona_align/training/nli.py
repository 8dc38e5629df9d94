"""Train the NLI cross-encoder behind C and UE: LoRA over a small encoder, small enough to ship.

The base (by default the embedded all-MiniLM-L6-v2) stays as installed; only the LoRA
matrices, the classification head (pooler + classifier) and, with ``train_norms``, the
LayerNorms and biases are trained and saved, a few MB that load over the base weights.

Training data: Dialogue NLI ``nli-train.txt`` plus the MNLI matched/mismatched-hard and
SNLI-hard sets. SICK is left out on purpose: its licence (CC BY-NC-SA) does not allow shipping
a model trained on it. DNLI ``nli-valid.txt`` is held out, de-duplicated and stripped of any
pair that is also in training.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from persona_align.data.nli import LABELS, NLIPair, read_nli
from persona_align.errors import InputError
from persona_align.files import check_output_folder
from persona_align.metrics.nli import NLIModel, evaluate_nli, quiet_transformers
from persona_align.models import resolve

# LoRA on every linear layer inside the transformer blocks (BERT/RoBERTa/MiniLM naming); the
# pooler and classifier are trained in full instead.
LORA_TARGETS = (
    r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
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


def _batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length: sort within windows of 50 batches, then shuffle."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lengths.__getitem__)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@contextlib.contextmanager
def _progress(console: Any, label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on ``console``, or nothing when it is None."""
    if console is None:
        yield lambda _: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _check(name: str, value: float, low: float) -> None:
    if value < low:
        raise InputError(None, f"{name} must be at least {low}, got {value}")


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
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    _check("epochs", epochs, 1)
    _check("lr", lr, 1e-12)
    _check("lora_r", lora_r, 1)
    _check("batch_size", batch_size, 1)
    _check("max_length", max_length, 8)
    if max_pairs is not None:
        _check("max_pairs", max_pairs, 1)
    out = Path(out_dir)
    replaceable = out.is_dir() and (
        (out / "adapter_config.json").is_file() or not any(out.iterdir())
    )
    if out.exists() and not replaceable:
        raise InputError(out, "exists and is not an adapter folder; refusing to replace it")
    check_output_folder(out.parent)  # the adapter is built beside it, then renamed
    data = load_training_data(data_dir)
    rng = random.Random(seed)
    train = list(data.train)
    if max_pairs is not None and max_pairs < len(train):
        train = rng.sample(train, max_pairs)
    try:
        location = resolve(base).location
    except InputError as err:
        raise InputError(None, f"--base: {err}") from None

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(location)
    config = AutoConfig.from_pretrained(
        location,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
        problem_type="single_label_classification",
    )
    with quiet_transformers():
        base_model = AutoModelForSequenceClassification.from_pretrained(location, config=config)
    encoder = getattr(base_model, base_model.base_model_prefix)
    head = ["classifier"] + (["pooler"] if getattr(encoder, "pooler", None) is not None else [])
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora_r,
        lora_alpha=lora_alpha or 2 * lora_r,
        lora_dropout=0.0,  # BERT's own dropout regularises; LoRA dropout costs ~15% more CPU
        target_modules=LORA_TARGETS,
        modules_to_save=head + (["LayerNorm"] if train_norms else []),
        bias="lora_only" if train_norms else "none",
    )
    with quiet_transformers():
        model = get_peft_model(base_model, lora)
    model.peft_config["default"].base_model_name_or_path = base

    encoded = tokenizer(
        [p.premise for p in train], [p.hypothesis for p in train], truncation=True,
        max_length=max_length,
    )  # fmt: skip
    labels = [LABELS.index(p.label) for p in train]
    lengths = [len(ids) for ids in encoded["input_ids"]]
    plan = [b for _ in range(epochs) for b in _batches(lengths, batch_size, rng)]
    if max_steps is not None:
        plan = plan[:max_steps]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * len(plan)), len(plan))

    began = time.perf_counter()
    model.train()
    with _progress(progress, "training NLI", len(plan)) as advance:
        for rows in plan:
            batch = tokenizer.pad(
                [{key: encoded[key][i] for key in encoded} for i in rows], return_tensors="pt"
            )
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(**batch).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float(), torch.tensor([labels[i] for i in rows])
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            advance(1)
    seconds = time.perf_counter() - began

    settings = {
        "epochs": epochs, "lr": lr, "lora_r": lora_r, "lora_alpha": lora_alpha or 2 * lora_r,
        "batch_size": batch_size, "max_length": max_length, "train_norms": train_norms,
        "bf16": bf16, "seed": seed, "max_pairs": max_pairs, "max_steps": max_steps,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    result = NLITrainResult(
        base, len(train), len(data.valid), len(plan), round(seconds, 1), settings,
        data.sources,
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make a shipped or shared adapter unreadable
    try:
        with quiet_transformers():  # PEFT warns that "embedded-minilm" is not a folder
            model.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
        config.save_pretrained(tmp)
        if evaluate and data.valid:
            nli = NLIModel(str(tmp), batch_size=128)
            with _progress(progress, "evaluating", len(data.valid)) as advance:
                result.valid = evaluate_nli(nli, data.valid, advance).as_dict()
        (tmp / "training.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
