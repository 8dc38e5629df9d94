"""The HF Trainer under our pair classifiers (``cross_encoder.fit_pair_classifier``): the
device policy, bf16, accelerate/DDP come from it; the batches (similar lengths, seeded) and
the per-example loss weights from us. A module of its own so that importing the stage does not
import transformers' Trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import Trainer, TrainerCallback


class PairCollator:
    """Pads the encoded pairs; labels (or target distributions) and per-example loss weights
    ride along as tensors."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        extra = ("labels", "weight", "targets")
        texts = [{k: v for k, v in row.items() if k not in extra} for row in rows]
        batch = dict(self.tokenizer.pad(texts, return_tensors="pt"))
        batch["labels"] = torch.tensor([row["labels"] for row in rows])
        batch["weight"] = torch.tensor([float(row["weight"]) for row in rows])
        if "targets" in rows[0]:
            batch["targets"] = torch.tensor([row["targets"] for row in rows], dtype=torch.float32)
        return batch


class PairTrainer(Trainer):
    """The HF Trainer (devices, bf16, accelerate/DDP) with the planned batches and each
    example's cross-entropy scaled by its weight (class balance, read labels)."""

    def __init__(self, *args: Any, batches: Sampler[list[int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches = batches

    def get_train_dataloader(self) -> Any:
        loader = DataLoader(
            self.train_dataset, batch_sampler=self.batches, collate_fn=self.data_collator
        )
        return self.accelerator.prepare(loader)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        weights, labels = inputs.pop("weight"), inputs.pop("labels")
        targets = inputs.pop("targets", None)
        outputs = model(**inputs)
        # cross-entropy against the hard label, or against a target distribution
        per_row = torch.nn.functional.cross_entropy(
            outputs.logits.float(), labels if targets is None else targets, reduction="none"
        )
        loss = (per_row * weights).sum() / weights.sum()
        return (loss, outputs) if return_outputs else loss


class Progress(TrainerCallback):
    """Advances the progress bar and keeps each step's loss."""

    def __init__(self, advance: Callable[[int], None], losses: list[float]) -> None:
        self.advance, self.losses = advance, losses

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.advance(1)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
