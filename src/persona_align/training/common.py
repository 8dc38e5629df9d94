"""What every trainer here shares: device defaults, LoRA, length checks, checkpoints, outputs.

A run folder holds ``checkpoint-*`` (TRL/Trainer checkpoints, for ``--resume``), ``log.jsonl``
(one line per logged step), ``curves.png``, ``model/`` (the LoRA adapter or the full model,
with its tokenizer and ``persona-align.json``) and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint

from persona_align import devices
from persona_align.config import TrainConfig
from persona_align.errors import InputError
from persona_align.files import check_output_folder, require_file
from persona_align.models import ADAPTER_META, load_causal_lm
from persona_align.records import Message, atomic_open
from persona_align.training.curves import (
    finite,
    plot_training_curves,
    read_training_log,
    truncate_log,
)

# LoRA learns at a far higher rate than full fine-tuning (PersoDPO's 1e-6 is for a full model).
DEFAULT_LR = {
    ("dpo", "lora"): 5e-5,
    ("dpo", "full"): 1e-6,
    ("sft", "lora"): 2e-4,
    ("sft", "full"): 2e-5,
}


@dataclass(frozen=True)
class DeviceDefaults:
    """Settings that depend on the hardware (never the batch): bf16 and checkpointing pay off
    on GPUs only."""

    device: str
    precision: str
    gradient_checkpointing: bool


def device_defaults() -> DeviceDefaults:
    """For the device policy's device (``devices``)."""
    where = devices.current()
    if where.startswith("cuda"):
        precision = "bf16" if devices.default_dtype(where) == "bfloat16" else "fp32"
        return DeviceDefaults(where, precision, True)
    # On CPUs fp32 is the safe default: without bf16 matrix units bf16 runs several times slower.
    return DeviceDefaults(where, "fp32", False)


SHARE_NEEDS_CACHE = (
    "share_prompt needs the key/value cache, which gradient checkpointing turns off; "
    "set one of them to false"
)


def memory_settings(config: TrainConfig) -> tuple[bool, bool]:
    """(gradient checkpointing, share_prompt): an explicit choice of one sets the default of the
    other; both on is refused (checkpointed layers run without the cache sharing needs)."""
    if config.gradient_checkpointing and config.share_prompt:
        raise InputError(None, SHARE_NEEDS_CACHE, field="train.share_prompt")
    checkpointing = config.gradient_checkpointing
    if checkpointing is None:
        checkpointing = device_defaults().gradient_checkpointing and not config.share_prompt
    share = (not checkpointing) if config.share_prompt is None else config.share_prompt
    return checkpointing, share


def training_precision(config: TrainConfig) -> str:
    """``bf16`` or ``fp32``: the config's, or the device's default."""
    return device_defaults().precision if config.precision == "auto" else config.precision


def run_paths(config: TrainConfig) -> tuple[Path, Path]:
    """(data file, run folder); both are required once a trainer actually runs, and checked
    before the model loads."""
    for key in ("data", "output_dir"):
        if getattr(config, key) is None:
            raise InputError(None, "missing", field=f"train.{key}")
    return require_file(config.data), check_output_folder(config.output_dir)  # type: ignore[arg-type]


def trainer_arguments(config: TrainConfig) -> dict[str, Any]:
    """The transformers/TRL arguments this config implies, device defaults filled in."""
    defaults = device_defaults()
    precision = training_precision(config)
    checkpointing, _ = memory_settings(config)
    return {
        "output_dir": str(config.output_dir),
        "learning_rate": config.learning_rate or DEFAULT_LR[(config.method, config.finetune)],
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps,
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "warmup_steps": config.warmup_steps,
        "max_length": config.max_length,
        "activation_checkpointing": checkpointing,
        "bf16": precision == "bf16",
        "fp16": False,
        "use_cpu": defaults.device == "cpu",
        "logging_steps": config.logging_steps,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": config.save_total_limit,
        "seed": config.seed,
        "data_seed": config.seed,
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def lora_config(config: TrainConfig) -> Any:
    """PEFT LoRA settings, or None for full fine-tuning."""
    if config.finetune != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        task_type="CAUSAL_LM",
    )


@contextlib.contextmanager
def quiet_training_logs() -> Iterator[None]:
    """Our per-step log file and summary report progress; silence the libraries' bars and notes."""
    import datasets
    import transformers

    previous = transformers.logging.get_verbosity(), os.environ.get("TQDM_DISABLE")
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    datasets.disable_progress_bars()
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous[0])
        datasets.enable_progress_bars()
        if previous[1] is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous[1]


def load_for_training(name: str, dtype: str = "float32") -> tuple[Any, Any]:
    """The model with every weight trainable (LoRA freezes the base itself): a merged adapter,
    such as PAL's stage-1 model, comes back from PEFT with its weights frozen. ``dtype``: a
    LoRA run in bf16 holds its frozen base in bf16 (half the memory); a full fine-tune keeps
    fp32 master weights."""
    model, tokenizer = load_causal_lm(name, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(True)
    model.train()
    return model, tokenizer


@dataclass
class LengthReport:
    """Examples that do not fit ``max_length``: dropped (prompt alone too long) or truncated."""

    dropped: list[str]
    truncated: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "dropped_prompt_too_long": len(self.dropped),
            "dropped_ids": self.dropped[:20],
            "truncated_completion": len(self.truncated),
            "truncated_ids": self.truncated[:20],
        }


def check_lengths(
    tokenizer: Any,
    ids: Sequence[str],
    prompts: Sequence[list[Message]],
    completions: Sequence[Sequence[list[Message]]],
    max_length: int,
) -> LengthReport:
    """Find examples whose prompt fills ``max_length`` (TRL would silently drop them) and those
    whose completion gets cut, so both are reported instead of vanishing."""
    dropped, truncated = [], []
    for ident, prompt, options in zip(ids, prompts, completions, strict=True):
        as_dicts = [m.model_dump() for m in prompt]
        prompt_len = len(_chat_ids(tokenizer, as_dicts, add_generation_prompt=True))
        if prompt_len >= max_length:
            dropped.append(ident)
            continue
        longest = max(
            len(_chat_ids(tokenizer, as_dicts + [m.model_dump() for m in option]))
            for option in options
        )
        if longest > max_length:
            truncated.append(ident)
    return LengthReport(dropped, truncated)


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def rows_for_steps(rows: list[dict[str, Any]], config: TrainConfig) -> list[dict[str, Any]]:
    """Only the examples ``max_steps`` will reach (a seeded sample), when that is fewer than
    all: precomputing reference log-probs for examples no step uses is wasted work."""
    if config.max_steps <= 0:
        return rows
    args = trainer_arguments(config)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    needed = (
        config.max_steps
        * args["per_device_train_batch_size"]
        * args["gradient_accumulation_steps"]
        * world
    )
    if needed >= len(rows):
        return rows
    return random.Random(config.seed).sample(rows, needed)


def file_dataset(rows: list[dict[str, Any]], output_dir: Path) -> Any:
    """The training rows as a file-backed dataset cached inside the run folder.

    An in-memory dataset caches derived files (TRL's precomputed reference log-probs) in a
    per-process temp folder; under several processes the ranks must share them.
    """
    from accelerate import PartialState
    from datasets import load_dataset

    data = output_dir / "data" / "train.jsonl"
    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    cache = output_dir / "data" / "cache"
    # the main process writes and caches first; the other ranks then read what it built
    with PartialState().main_process_first():
        if not data.exists() or data.read_text(encoding="utf-8") != text:
            with atomic_open(data) as handle:
                handle.write(text)
        return load_dataset("json", data_files=str(data), split="train", cache_dir=str(cache))


class JsonlLogCallback(TrainerCallback):
    """Appends each training log (with its step and epoch) to a JSONL file on the main process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            truncate_log(self.path, state.global_step)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        entry = {"step": state.global_step, "epoch": state.epoch, **logs}
        entry = {k: v for k, v in entry.items() if isinstance(v, int | float | str)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")


class ConsoleLogCallback(TrainerCallback):
    """One short line per log on stderr instead of the Trainer's raw dicts."""

    KEYS = (("loss", "loss"), ("rewards/margins", "margin"), ("rewards/accuracies", "acc"),
            ("grad_norm", "grad"), ("learning_rate", "lr"))  # fmt: skip

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        parts = [f"{label} {logs[key]:.4g}" for key, label in self.KEYS if finite(logs.get(key))]
        print(f"step {state.global_step}/{state.max_steps}  " + "  ".join(parts), file=sys.stderr)


class RankFingerprintCallback(TrainerCallback):
    """Under several processes, each rank writes a hash of its trainable weights at the end,
    so a run can prove its replicas stayed in sync."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        if args.world_size < 2 or model is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"rank-{args.process_index}.json"
        with atomic_open(target) as handle:
            json.dump({"rank": args.process_index, "sha256": weights_fingerprint(model)}, handle)


def weights_fingerprint(model: Any) -> str:
    """A hash of the trainable parameters (all parameters when none is marked trainable)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad] or list(
        model.named_parameters()
    )
    digest = hashlib.sha256()
    for name, param in sorted(params, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(param.detach().to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()


def resume_checkpoint(output_dir: Path, resume: bool) -> str | None:
    """The last checkpoint to resume from, or None for a fresh run.

    A fresh run into a folder that already holds checkpoints is refused rather than mixing two
    runs' checkpoints and logs.
    """
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last is not None and not resume:
        raise InputError(
            output_dir,
            f"already holds {Path(last).name}; pass --resume to continue it, or pick another "
            "output_dir",
        )
    return last


def callbacks(output_dir: Path, extra: Sequence[TrainerCallback] = ()) -> list[Any]:
    return [
        JsonlLogCallback(output_dir / "log.jsonl"),
        ConsoleLogCallback(),
        RankFingerprintCallback(output_dir / "ranks"),
        *extra,
    ]


def without_printer(trainer: Any) -> Any:
    """Drop the Trainer's raw-dict printer; ConsoleLogCallback reports instead."""
    trainer.remove_callback(PrinterCallback)
    return trainer


def finish(
    trainer: Any, tokenizer: Any, config: TrainConfig, summary: dict[str, Any], began: float
) -> dict[str, Any]:
    """Save the model (adapter or merged), the curves and ``summary.json``; main process only."""
    output_dir = Path(config.output_dir)
    if not trainer.is_world_process_zero():
        return {**summary, "main_process": False}
    model_dir = output_dir / "model"
    model = trainer.model
    if config.save == "merged" and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    # an adapter trained over another adapter loads over that one (merged), hence config.model
    base = str(Path(config.model).resolve()) if Path(config.model).is_dir() else config.model
    with atomic_open(model_dir / ADAPTER_META) as handle:
        json.dump({"base_model": base, "method": config.method}, handle, indent=2)
    log = read_training_log(output_dir / "log.jsonl")
    plotted = plot_training_curves(log, output_dir / "curves.png")
    history = [e for e in log if "loss" in e]
    summary.update(
        {
            "model_dir": str(model_dir),
            "steps": trainer.state.global_step,
            "first_loss": history[0]["loss"] if history else None,
            "last_loss": history[-1]["loss"] if history else None,
            "curves": plotted,
            "seconds": round(time.perf_counter() - began, 1),
        }
    )
    with atomic_open(output_dir / "summary.json") as handle:
        json.dump(summary, handle, indent=2, sort_keys=True)
    return summary


@dataclass
class TrainingSet:
    """Rows for a TRL trainer, with what the length check needs: one key, prompt and set of
    completions per row (a key names the row in reports)."""

    keys: list[str]
    prompts: list[list[Message]]
    completions: list[tuple[list[Message], ...]]
    rows: list[dict[str, Any]]


def train_rows(
    config: TrainConfig,
    resume: bool,
    load: Callable[[Path], TrainingSet],
    trainer_class: type,
    config_class: type,
    method_args: dict[str, Any],
    describe: Callable[[list[str], int], dict[str, Any]],
    extra_callbacks: Sequence[TrainerCallback] = (),
) -> dict[str, Any]:
    """The sequence every trainer runs: read the examples (``load(path) -> TrainingSet``),
    drop prompts that do not fit, keep what ``max_steps`` reaches, train (resuming if asked),
    then save and summarise (``describe(kept_keys, used_count) -> dict`` adds the method's
    own summary fields)."""
    began = time.perf_counter()
    data, output_dir = run_paths(config)
    checkpoint = resume_checkpoint(output_dir, resume)
    examples = load(data)
    lora_bf16 = config.finetune == "lora" and training_precision(config) == "bf16"
    model, tokenizer = load_for_training(config.model, "bfloat16" if lora_bf16 else "float32")
    lengths = check_lengths(
        tokenizer, examples.keys, examples.prompts, examples.completions, config.max_length
    )
    too_long = set(lengths.dropped)
    kept = [(key, row) for key, row in zip(examples.keys, examples.rows, strict=True)
            if key not in too_long]  # fmt: skip
    rows = [row for _, row in kept]
    if not rows:
        raise InputError(data, f"every prompt is longer than max_length={config.max_length}")
    used = rows_for_steps(rows, config)
    with quiet_training_logs():
        trainer = without_printer(
            trainer_class(
                model=model,
                args=config_class(**trainer_arguments(config), **method_args),
                train_dataset=file_dataset(used, output_dir),
                processing_class=tokenizer,
                peft_config=lora_config(config),
                callbacks=callbacks(output_dir, extra_callbacks),
            )
        )
        trainer.train(resume_from_checkpoint=checkpoint)
    summary = {
        "method": config.method,
        "finetune": config.finetune,
        "device": device_defaults().device,
        "precision": training_precision(config),
        "effective_batch": config.batch_size * config.grad_accum,
        **describe([key for key, _ in kept], len(used)),
        **lengths.as_dict(),
        "resumed_from": Path(checkpoint).name if checkpoint else None,
    }
    return finish(trainer, tokenizer, config, summary, began)
