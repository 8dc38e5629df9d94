"""Score-weighted DPO (PersoDPO): each pair's DPO loss times its weight, then averaged.

PersoDPO's released trainer overrode a method TRL never calls and let TRL drop the weight
columns, so its weighting never ran. Here the weight column is kept through TRL's column
pruning and collator, stays out of the model forward, and multiplies each pair's own stock
DPO loss. Pairs are evaluated one at a time inside a batch, so every per-pair loss is exactly
the stock trainer's loss for that pair (on CPU this costs little: batching long sequences
saves no compute there). Relies on ``DPOTrainer._compute_loss``, hence the exact TRL pin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from persona_align.config import TrainConfig
from persona_align.errors import InputError
from persona_align.records import PreferencePair, read_records
from persona_align.training.common import TrainingSet, train_rows

WEIGHT_KEY = "pair_weight"


@dataclass
class WeightedDPOConfig(DPOConfig):
    """DPOConfig plus the column holding each pair's weight (None: every weight is 1)."""

    weight_column: str | None = field(
        default="weight",
        metadata={"help": "Dataset column with the per-pair loss weight; None for vanilla DPO."},
    )


class _WeightedCollator:
    """The stock preference collator, plus the weights as one float tensor."""

    def __init__(self, base: Any, column: str) -> None:
        self.base, self.column = base, column

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        batch[WEIGHT_KEY] = torch.tensor([float(e[self.column]) for e in examples])
        return batch


def _pair_slice(inputs: dict[str, Any], index: int, pairs: int) -> dict[str, Any]:
    """Pair ``index`` of a batch whose sequence tensors stack [chosen..., rejected...]."""
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == 2 * pairs:
            out[key] = value[[index, pairs + index]]
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == pairs:
            out[key] = value[index : index + 1]
        else:
            out[key] = value
    return out


class WeightedDPOTrainer(DPOTrainer):
    """DPOTrainer whose loss is the weighted mean of per-pair DPO losses."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        column = getattr(self.args, "weight_column", None)
        if column is not None:
            for name, dataset in (("train", self.train_dataset), ("eval", self.eval_dataset)):
                if dataset is not None and column not in dataset.column_names:
                    raise ValueError(
                        f"{name} dataset has no {column!r} column for the pair weights"
                    )
            self.data_collator = _WeightedCollator(self.data_collator, column)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        column = getattr(self.args, "weight_column", None)
        if column is not None and column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, column]

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        weights = inputs.pop(WEIGHT_KEY, None)
        if weights is None:
            return super()._compute_loss(model, inputs, return_outputs)
        pairs = weights.size(0)
        losses = [
            super(WeightedDPOTrainer, self)._compute_loss(
                model, _pair_slice(inputs, i, pairs), False
            )
            for i in range(pairs)
        ]
        loss = (torch.stack(losses) * weights.to(losses[0].device)).mean()
        return (loss, {}) if return_outputs else loss


def pair_weights(pairs: list[PreferencePair], weighting: str, path: Path) -> list[float]:
    """Per-pair weights: PersoDPO's sigmoid of the score gap, all ones, or a named column."""
    if weighting == "sigmoid":
        return [1 / (1 + math.exp(-(p.score_chosen - p.score_rejected))) for p in pairs]
    if weighting == "one":
        return [1.0] * len(pairs)
    name = weighting.removeprefix("column:")
    if not weighting.startswith("column:") or name not in PreferencePair.model_fields:
        raise InputError(
            path,
            f"unknown weighting {weighting!r}; use sigmoid, one or column:NAME with NAME one of "
            "weight, score_chosen, score_rejected",
            field="train.weighting",
        )
    values = [getattr(p, name) for p in pairs]
    if not all(isinstance(v, int | float) for v in values):
        raise InputError(path, f"column {name!r} is not numeric", field="train.weighting")
    return [float(v) for v in values]


def load_pairs(path: Path) -> tuple[list[PreferencePair], int]:
    """The pairs file, minus pairs whose chosen equals rejected (counted, they teach nothing)."""
    pairs = read_records(path, PreferencePair)
    kept = [p for p in pairs if p.chosen != p.rejected]
    if not kept:
        raise InputError(
            path, "no usable preference pairs (empty, or every chosen equals rejected)"
        )
    return kept, len(pairs) - len(kept)


def train_dpo(
    config: TrainConfig, resume: bool = False, extra_callbacks: Sequence[TrainerCallback] = ()
) -> dict[str, Any]:
    """Score-weighted (or vanilla) DPO with LoRA by default; returns the run summary."""
    identical = 0

    def load(data: Path) -> TrainingSet:
        nonlocal identical
        pairs, identical = load_pairs(data)
        weights = pair_weights(pairs, config.weighting, data)
        return TrainingSet(
            keys=[p.dialogue_id for p in pairs],
            prompts=[p.prompt for p in pairs],
            completions=[(p.chosen, p.rejected) for p in pairs],
            rows=[
                {
                    "dialogue_id": p.dialogue_id,
                    "prompt": [m.model_dump() for m in p.prompt],
                    "chosen": [m.model_dump() for m in p.chosen],
                    "rejected": [m.model_dump() for m in p.rejected],
                    "weight": w,
                }
                for p, w in zip(pairs, weights, strict=True)
            ],
        )

    def describe(kept: list[str], used: int) -> dict[str, Any]:
        return {
            "weighting": config.weighting,
            "pairs": len(kept),
            "pairs_used": used,
            "dropped_identical": identical,
        }

    method_args = {
        "beta": config.beta,
        "precompute_ref_log_probs": config.precompute_ref,
        "weight_column": "weight",
    }
    return train_rows(
        config, resume, load, WeightedDPOTrainer, WeightedDPOConfig, method_args, describe,
        extra_callbacks,
    )  # fmt: skip
