"""Supervised fine-tuning on prompt-completion examples (PAL stage 1, SBS), loss on completions.

TRL's SFTTrainer computes the loss on completion tokens only for prompt-completion datasets,
which is what both PAL's mixed-task learning and SBS's score-conditioned training need.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from persona_align.config import TrainConfig
from persona_align.errors import InputError
from persona_align.records import SFTExample, read_records
from persona_align.training.common import (
    callbacks,
    check_lengths,
    file_dataset,
    finish,
    load_for_training,
    lora_config,
    quiet_training_logs,
    resume_checkpoint,
    rows_for_steps,
    run_paths,
    trainer_arguments,
    without_printer,
)


def train_sft(
    config: TrainConfig, resume: bool = False, extra_callbacks: Sequence[TrainerCallback] = ()
) -> dict[str, Any]:
    """Fine-tune on ``SFTExample`` records (LoRA by default); returns the run summary."""
    began = time.perf_counter()
    data, output_dir = run_paths(config)
    checkpoint = resume_checkpoint(output_dir, resume)
    examples = read_records(data, SFTExample)
    if not examples:
        raise InputError(data, "no SFT examples")
    model, tokenizer = load_for_training(config.model)
    keys = [f"{e.dialogue_id}/{e.task}/{i}" for i, e in enumerate(examples)]
    lengths = check_lengths(
        tokenizer, keys, [e.prompt for e in examples], [(e.completion,) for e in examples],
        config.max_length,
    )  # fmt: skip
    dropped = set(lengths.dropped)
    rows = [
        {
            "prompt": [m.model_dump() for m in e.prompt],
            "completion": [m.model_dump() for m in e.completion],
        }
        for key, e in zip(keys, examples, strict=True)
        if key not in dropped
    ]
    if not rows:
        raise InputError(data, f"every prompt is longer than max_length={config.max_length}")
    used = rows_for_steps(rows, config)
    with quiet_training_logs():
        args = SFTConfig(**trainer_arguments(config), completion_only_loss=True)
        trainer = without_printer(
            SFTTrainer(
                model=model,
                args=args,
                train_dataset=file_dataset(used, output_dir),
                processing_class=tokenizer,
                peft_config=lora_config(config),
                callbacks=callbacks(output_dir, extra_callbacks),
            )
        )
        trainer.train(resume_from_checkpoint=checkpoint)
    tasks: dict[str, int] = {}
    for key, e in zip(keys, examples, strict=True):
        if key not in dropped:
            tasks[e.task] = tasks.get(e.task, 0) + 1
    summary = {
        "method": "sft",
        "finetune": config.finetune,
        "examples": len(rows),
        "examples_used": len(used),
        "tasks": tasks,
        **lengths.as_dict(),
        "resumed_from": Path(checkpoint).name if checkpoint else None,
    }
    return finish(trainer, tokenizer, config, summary, began)
