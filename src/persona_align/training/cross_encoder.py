"""LoRA fine-tuning of a small encoder as a pair classifier: the NLI model and our judges.

The base (by default the embedded all-MiniLM-L6-v2) stays as installed; only the LoRA
matrices, the classification head (pooler + classifier) and, with ``train_norms``, the
LayerNorms and biases are trained and saved: a few MB that load over the base weights.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_align import devices
from persona_align.errors import InputError
from persona_align.files import check_output_folder, write_folder
from persona_align.metrics.nli import quiet_transformers
from persona_align.models import resolve

# LoRA on every linear layer inside the transformer blocks (BERT/RoBERTa/MiniLM naming); the
# pooler and classifier are trained in full instead.
LORA_TARGETS = (
    r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)


@dataclass
class FitSettings:
    """What shapes a fine-tuning run; saved beside the adapter."""

    base: str = "embedded-minilm"
    epochs: int = 2
    lr: float = 1e-3
    lora_r: int = 16
    lora_alpha: int | None = None
    batch_size: int = 32
    max_length: int = 128
    train_norms: bool = True
    bf16: bool = False
    seed: int = 0
    max_steps: int | None = None
    init: str | None = None  # an adapter to continue from (e.g. embedded-nli), not a fresh LoRA
    layers: int | None = None  # keep only the base's first N transformer layers (a faster judge)

    def check(self) -> None:
        for name, low in (("epochs", 1), ("lr", 1e-12), ("lora_r", 1), ("batch_size", 1),
                          ("max_length", 8)):  # fmt: skip
            if getattr(self, name) < low:
                raise InputError(None, f"{name} must be at least {low}, got {getattr(self, name)}")
        if self.layers is not None and self.layers < 1:
            raise InputError(None, f"layers must be at least 1, got {self.layers}")

    def as_dict(self) -> dict[str, Any]:
        import torch

        return {
            "epochs": self.epochs, "lr": self.lr, "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha or 2 * self.lora_r, "batch_size": self.batch_size,
            "max_length": self.max_length, "train_norms": self.train_norms, "bf16": self.bf16,
            "seed": self.seed, "max_steps": self.max_steps, "threads": torch.get_num_threads(),
            "init": self.init, "layers": self.layers,
        }  # fmt: skip


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
def progress_bar(console: Any, label: str, total: int) -> Iterator[Callable[[int], None]]:
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


def check_output(out: Path) -> None:
    """Refuse to replace a folder that is not an adapter or judge folder (or empty)."""
    ours = ("adapter_config.json", "judge.json")
    replaceable = out.is_dir() and (
        any((out / name).is_file() for name in ours) or not any(out.iterdir())
    )
    if out.exists() and not replaceable:
        raise InputError(out, "exists and is not an adapter folder; refusing to replace it")
    check_output_folder(out.parent)  # the folder is built beside it, then renamed


def fit_pair_classifier(
    pairs: Sequence[tuple[str, str]],
    labels: Sequence[int],
    label_names: Sequence[str],
    settings: FitSettings,
    *,
    weights: Sequence[float] | None = None,
    targets: Sequence[Sequence[float]] | None = None,
    progress: Any = None,
    what: str = "training",
) -> tuple[Any, Any, Any, list[float], float]:
    """Train LoRA + head on (text_a, text_b) → label; (model, tokenizer, config, the loss of
    every step, seconds).

    Deterministic for a seed (and a thread count). ``weights`` scales each example's loss
    (class balance). ``targets``: a label distribution per example (a teacher's, for
    distillation) trained towards instead of ``labels``. ``max_steps`` stops early.
    """
    settings.check()
    model, tokenizer, config = _trainable_model(settings, label_names, what)
    encoded = tokenizer(
        [a for a, _ in pairs], [b for _, b in pairs], truncation=True,
        max_length=settings.max_length,
    )  # fmt: skip
    rows = [
        {**{key: encoded[key][i] for key in encoded}, "labels": label, "weight": weight}
        for i, (label, weight) in enumerate(
            zip(labels, weights if weights is not None else [1.0] * len(pairs), strict=True)
        )
    ]
    if targets is not None:
        for row, target in zip(rows, targets, strict=True):
            row["targets"] = list(target)
    batches = _PlannedBatches([len(ids) for ids in encoded["input_ids"]], settings)
    began = time.perf_counter()
    losses = _train(model, tokenizer, rows, batches, settings, progress, what)
    model.eval()
    return model.cpu(), tokenizer, config, losses, time.perf_counter() - began


def _trainable_model(
    settings: FitSettings, label_names: Sequence[str], what: str
) -> tuple[Any, Any, Any]:
    """(LoRA model placed by the device policy, tokenizer, config) over the base's first
    ``settings.layers`` layers: a fresh adapter, or ``settings.init`` continued."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    try:
        location = resolve(settings.base).location
    except InputError as err:
        raise InputError(None, f"--base: {err}") from None
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(location)
    config = AutoConfig.from_pretrained(location)
    if settings.layers is not None and settings.layers > config.num_hidden_layers:
        raise InputError(
            None, f"layers: {settings.base} has {config.num_hidden_layers}, got {settings.layers}"
        )
    config = AutoConfig.from_pretrained(
        location,
        num_hidden_layers=settings.layers or config.num_hidden_layers,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={label: i for i, label in enumerate(label_names)},
        problem_type="single_label_classification",
    )
    with quiet_transformers():
        base_model = AutoModelForSequenceClassification.from_pretrained(location, config=config)
    encoder = getattr(base_model, base_model.base_model_prefix)
    head = ["classifier"] + (["pooler"] if getattr(encoder, "pooler", None) is not None else [])
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha or 2 * settings.lora_r,
        lora_dropout=0.0,  # BERT's own dropout regularises; LoRA dropout costs ~15% more CPU
        target_modules=LORA_TARGETS,
        modules_to_save=head + (["LayerNorm"] if settings.train_norms else []),
        bias="lora_only" if settings.train_norms else "none",
    )
    with quiet_transformers():
        if settings.init is None:
            model = get_peft_model(base_model, lora)
        else:
            model = _continue_from(base_model, settings.init, label_names)
    model.peft_config["default"].base_model_name_or_path = settings.base
    devices.place(model, what)
    return model, tokenizer, config


def _train(
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    batches: _PlannedBatches,
    settings: FitSettings,
    progress: Any,
    what: str,
) -> list[float]:
    """Run the HF Trainer over the planned batches; the loss of every step."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from persona_align.training.pair_trainer import PairCollator, PairTrainer, Progress

    steps = settings.epochs * len(batches)
    if settings.max_steps is not None:
        steps = min(steps, settings.max_steps)
    losses: list[float] = []
    with tempfile.TemporaryDirectory() as scratch, progress_bar(progress, what, steps) as advance:
        trainer = PairTrainer(
            model=model,
            args=TrainingArguments(
                output_dir=scratch,
                per_device_train_batch_size=settings.batch_size,
                num_train_epochs=settings.epochs,
                max_steps=steps,
                learning_rate=settings.lr,
                weight_decay=0.01,
                lr_scheduler_type="linear",
                warmup_steps=int(0.06 * steps),
                max_grad_norm=1.0,
                bf16=settings.bf16,
                use_cpu=model.device.type == "cpu",
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                disable_tqdm=True,
                seed=settings.seed,
                data_seed=settings.seed,
                dataloader_num_workers=0,
                remove_unused_columns=False,
            ),
            train_dataset=rows,
            data_collator=PairCollator(tokenizer),
            callbacks=[Progress(advance, losses)],
            batches=batches,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return losses


class _PlannedBatches:
    """The batch sampler: each epoch, shuffled batches of similar length (``_batches``), drawn
    from one seeded generator, so a run is the same for a seed."""

    def __init__(self, lengths: Sequence[int], settings: FitSettings) -> None:
        self.lengths, self.size = list(lengths), settings.batch_size
        self.rng = random.Random(settings.seed)
        window = self.size * 50
        self.count = sum(
            -(-min(window, len(lengths) - start) // self.size)
            for start in range(0, len(lengths), window)
        )

    def __iter__(self) -> Iterator[list[int]]:
        yield from _batches(self.lengths, self.size, self.rng)

    def __len__(self) -> int:
        return self.count


def loss_curve(losses: Sequence[float], points: int = 20) -> list[float]:
    """Mean loss over ``points`` equal stretches of training: enough to see it fall."""
    size = max(1, -(-len(losses) // points))
    return [round(sum(chunk) / len(chunk), 4) for chunk in
            (losses[i : i + size] for i in range(0, len(losses), size))]  # fmt: skip


def _continue_from(base_model: Any, init: str, label_names: Sequence[str]) -> Any:
    """The adapter ``init`` (a folder or a shipped name) over ``base_model``, trainable: its
    LoRA, head and norms are where training starts (an NLI-trained [CLS] head learns a related
    pair task in far fewer steps than a fresh one over a mean-pooling sentence encoder)."""
    import json

    from peft import PeftModel

    from persona_align.metrics.nli import EMBEDDED_CLASSIFIERS, embedded_dir

    folder = embedded_dir(init) if init in EMBEDDED_CLASSIFIERS else Path(init)
    if not (folder / "adapter_config.json").is_file():
        raise InputError(folder, "is not an adapter folder (no adapter_config.json)")
    labels = json.loads((folder / "config.json").read_text()).get("id2label", {})
    if [labels[k] for k in sorted(labels, key=int)] != list(label_names):
        raise InputError(folder, f"its labels {labels} are not {list(label_names)}")
    return PeftModel.from_pretrained(base_model, folder, is_trainable=True)


def save_adapter_files(folder: Path, model: Any, config: Any) -> None:
    """The adapter and the head's config, into an existing folder."""
    with quiet_transformers():  # PEFT warns that "embedded-minilm" is not a folder
        model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    config.save_pretrained(folder)


def save_adapter(
    out: Path, model: Any, config: Any, finish: Callable[[Path], None] | None = None
) -> None:
    """Write the adapter (and the head's config) to ``out`` atomically; ``finish(tmp)`` adds
    files (evaluation, judge.json) before the folder appears. An existing one is replaced."""

    def fill(tmp: Path) -> None:
        save_adapter_files(tmp, model, config)
        if finish is not None:
            finish(tmp)

    write_folder(out, fill)
