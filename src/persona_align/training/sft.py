"""Supervised fine-tuning on prompt-completion examples (PAL stage 1, SBS), loss on completions.

TRL's SFTTrainer computes the loss on completion tokens only for prompt-completion datasets,
which is what both PAL's mixed-task learning and SBS's score-conditioned training need.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from persona_align.config import TrainConfig
from persona_align.errors import InputError
from persona_align.records import SFTExample, read_records
from persona_align.training.common import TrainingSet, train_rows


def train_sft(
    config: TrainConfig, resume: bool = False, extra_callbacks: Sequence[TrainerCallback] = ()
) -> dict[str, Any]:
    """Fine-tune on ``SFTExample`` records (LoRA by default); returns the run summary."""

    def load(data: Path) -> TrainingSet:
        examples = read_records(data, SFTExample)
        if not examples:
            raise InputError(data, "no SFT examples")
        return TrainingSet(
            keys=[f"{e.dialogue_id}/{e.task}/{i}" for i, e in enumerate(examples)],
            prompts=[e.prompt for e in examples],
            completions=[(e.completion,) for e in examples],
            rows=[
                {
                    "prompt": [m.model_dump() for m in e.prompt],
                    "completion": [m.model_dump() for m in e.completion],
                }
                for e in examples
            ],
        )

    def describe(kept: list[str], used: int) -> dict[str, Any]:
        return {
            "examples": len(kept),
            "examples_used": used,
            "tasks": dict(Counter(key.rsplit("/", 2)[1] for key in kept)),
        }

    return train_rows(
        config, resume, load, SFTTrainer, SFTConfig, {"completion_only_loss": True}, describe,
        extra_callbacks,
    )  # fmt: skip
