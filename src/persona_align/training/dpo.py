"""Score-weighted DPO (PersoDPO): each pair's DPO loss times its weight, then averaged.

PersoDPO's released trainer overrode a method TRL never calls and let TRL drop the weight
columns, so its weighting never ran. Here the weight column is kept through TRL's column
pruning and collator, stays out of the model forward, and multiplies each pair's own stock
DPO loss: TRL's loss code runs once per pair, so every per-pair loss is the stock trainer's
loss for that pair. The forward behind it runs either once for the whole batch (its rows
handed to each pair: what a GPU wants) or, with ``share_prompt``, once per pair with the
pair's prompt run once for both replies (what a CPU wants: batching saves it nothing, the
~800-token prompts dominate). Relies on ``DPOTrainer._compute_loss``, hence the exact TRL pin.
"""

from __future__ import annotations

import copy
import math
import os
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
from persona_align.training.common import (
    SHARE_NEEDS_CACHE,
    TrainingSet,
    memory_settings,
    train_rows,
)

WEIGHT_KEY = "pair_weight"


@dataclass
class WeightedDPOConfig(DPOConfig):
    """DPOConfig plus the column holding each pair's weight (None: every weight is 1)."""

    weight_column: str | None = field(
        default="weight",
        metadata={"help": "Dataset column with the per-pair loss weight; None for vanilla DPO."},
    )
    share_prompt: bool | None = field(
        default=None,
        metadata={
            "help": "Run the prompt a pair's chosen and rejected replies share through the "
            "model once (its keys and values serve both replies); same loss, less compute. "
            "It needs the key/value cache, which activation checkpointing turns off: None "
            "means on unless checkpointing is; both on is an error."
        },
    )
    weight_norm: str = field(
        default="none",
        metadata={
            "help": "'mean' scales the weights to mean 1 over the training set, so weighting "
            "changes how pairs share the loss, not the step size; 'none' keeps them."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.share_prompt is None:
            self.share_prompt = not self.activation_checkpointing
        elif self.share_prompt and self.activation_checkpointing:
            raise ValueError(SHARE_NEEDS_CACHE)


class _WeightedCollator:
    """The stock preference collator, plus the weights (times ``scale``) as one float tensor."""

    def __init__(self, base: Any, column: str, scale: float = 1.0) -> None:
        self.base, self.column, self.scale = base, column, scale

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        batch[WEIGHT_KEY] = torch.tensor([float(e[self.column]) * self.scale for e in examples])
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


class _PromptOnce:
    """Calls like the policy model on one pair's [chosen, rejected] rows, but runs the prompt
    they share once and scores only the reply tokens.

    The stock forward runs prompt + reply for each row and projects every position through
    the LM head (on CPU the fused head does not skip masked positions); FoCus prompts are
    ~800 tokens against ~50-token replies, so most of that work is repeated or discarded.
    Pass 1 runs the prompt minus its last token with a key/value cache; pass 2 runs the last
    prompt token and both replies over that cache (repeated for the two rows) and scores the
    replies through TRL's fused head with pre-shifted labels. Gradients flow through the
    cache into pass 1, so the loss and its gradient are the stock ones (up to rounding).
    """

    def __init__(self, model: Any, completion_mask: torch.Tensor) -> None:
        self.model, self.completion_mask = model, completion_mask

    def _shared(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
        """Length of the prompt both rows start with (real tokens, no reply token)."""
        same = (
            (input_ids[0] == input_ids[1])
            & (attention_mask[0] == 1)
            & (attention_mask[1] == 1)
            & (self.completion_mask[0] == 0)
            & (self.completion_mask[1] == 0)
        )
        return int(same.long().cumprod(0).sum())

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        **kwargs: Any,
    ) -> Any:
        shared = self._shared(input_ids, attention_mask) if input_ids.size(0) == 2 else 0
        if shared < 2 or set(kwargs) - {"use_cache", "fused_lm_head"}:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                              **kwargs)  # fmt: skip
        length = input_ids.size(1)
        prompt = self.model(
            input_ids=input_ids[:1, : shared - 1],
            attention_mask=attention_mask[:1, : shared - 1],
            use_cache=True,
            logits_to_keep=1,
        )
        cache = prompt.past_key_values
        cache.batch_repeat_interleave(2)
        # position t of pass 2 (token shared - 1 + t) predicts token shared + t
        shift_labels = torch.cat([labels[:, shared:], labels.new_full((2, 1), -100)], dim=1)
        out = self.model(
            input_ids=input_ids[:, shared - 1 :],
            attention_mask=attention_mask,
            past_key_values=cache,
            shift_labels=shift_labels,
            fused_lm_head=True,
        )
        # TRL reads per-token fields as [:, -(length - 1):]: prompt positions are 0 (masked),
        # as in the stock head
        for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1",
                     "label_mask"):  # fmt: skip
            value = getattr(out, name, None)
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                pad = value.new_zeros((2, length - 1 - value.size(1)))
                setattr(out, name, torch.cat([pad, value], dim=1))
        return out


class _BatchOnce:
    """Calls like the policy model on one pair's rows, but runs the whole batch through the
    model once (at the first call) and hands each pair its rows of that output.

    Right padding and a causal mask leave each row's real positions as they are alone, and
    TRL's fused head gives padded (label -100) positions zero log-probability, so each pair's
    loss is its stock loss; the one backward pass runs through the shared forward.
    """

    FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")

    def __init__(self, model: Any, inputs: dict[str, Any], pairs: int) -> None:
        self.model, self.inputs, self.pairs = model, inputs, pairs
        self.index = 0  # the pair the next call is for
        self.output: Any = None

    def __call__(self, labels: torch.Tensor, **kwargs: Any) -> Any:
        if self.output is None:
            full = self.inputs
            batch = {k: full.get(k, v) for k, v in kwargs.items()}
            mask = full["completion_mask"]
            self.output = self.model(**batch, labels=full["input_ids"].masked_fill(mask == 0, -100))
        rows = [self.index, self.pairs + self.index]
        self.index += 1
        out = copy.copy(self.output)
        for name in self.FIELDS:
            value = getattr(out, name, None)
            if isinstance(value, torch.Tensor) and value.size(0) == 2 * self.pairs:
                setattr(out, name, value[rows])
        return out


def _trim(pair: dict[str, Any]) -> dict[str, Any]:
    """Drop the padding columns a pair got from longer pairs of its batch (right padding)."""
    mask = pair.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return pair
    used = mask.any(dim=0).nonzero()
    if used.numel() == 0 or int(used[0]) != 0:  # left padding: leave as is
        return pair
    end = int(used[-1]) + 1
    length = mask.size(1)
    return {
        k: v[:, :end] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.size(1) == length else v
        for k, v in pair.items()
    }


def _fsdp(args: Any) -> bool:
    return bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def reference_copy(model: Any, args: Any, peft_config: Any) -> Any:
    """A frozen copy of the policy as loaded when TRL would otherwise rebuild the reference from
    ``model.config._name_or_path``, else None.

    TRL 1.16 does that for a full fine-tune without precomputed reference log-probs (and under
    FSDP). For a merged adapter, such as PAL's stage-1 model, that path names the adapter's base,
    not the model being trained, so DPO would pull towards the wrong model. With LoRA the
    reference is the model with its adapter disabled, with precomputed log-probs the policy
    before its first step: both are the model as loaded.
    """
    if isinstance(model, str) or peft_config is not None or hasattr(model, "peft_config"):
        return None
    if args.precompute_ref_log_probs and not _fsdp(args):
        return None
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


class WeightedDPOTrainer(DPOTrainer):
    """DPOTrainer whose loss is the weighted mean of per-pair DPO losses; its reference is
    always the policy as loaded (see :func:`reference_copy`)."""

    def __init__(self, model: Any, args: DPOConfig, ref_model: Any = None, **kwargs: Any) -> None:
        if ref_model is None:
            ref_model = reference_copy(model, args, kwargs.get("peft_config"))
        super().__init__(model=model, ref_model=ref_model, args=args, **kwargs)
        column = getattr(self.args, "weight_column", None)
        if column is not None:
            for name, dataset in (("train", self.train_dataset), ("eval", self.eval_dataset)):
                if dataset is not None and column not in dataset.column_names:
                    raise ValueError(
                        f"{name} dataset has no {column!r} column for the pair weights"
                    )
            self.data_collator = _WeightedCollator(
                self.data_collator, column, self._weight_scale(column)
            )

    def _weight_scale(self, column: str) -> float:
        """1, or 1 / the mean weight of the training set with ``weight_norm: mean``."""
        norm = getattr(self.args, "weight_norm", "none")
        if norm == "none":
            return 1.0
        if norm != "mean":
            raise ValueError(f"weight_norm must be 'none' or 'mean', got {norm!r}")
        weights = [float(w) for w in self.train_dataset[column]]
        mean = sum(weights) / len(weights)
        if mean <= 0:
            raise ValueError("weight_norm 'mean' needs a positive weight; every weight is 0")
        return 1.0 / mean

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        column = getattr(self.args, "weight_column", None)
        if column is not None and column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, column]

    def _policy(self, model: Any, pair: dict[str, Any]) -> Any:
        """The model, called through ``_PromptOnce`` when the prompt can be shared."""
        share = getattr(self.args, "share_prompt", False) and not self.aux_loss_enabled
        if share and getattr(
            self.accelerator.unwrap_model(model), "is_activation_checkpointing", 0
        ):
            raise ValueError(SHARE_NEEDS_CACHE)  # turned on after the config was checked
        return _PromptOnce(model, pair["completion_mask"]) if share else model

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> Any:
        """Reference log-probs (precomputed or per step), pair by pair with a shared prompt."""
        if not getattr(self.args, "share_prompt", False):
            return super().compute_ref_log_probs(model, inputs)
        pairs = inputs["input_ids"].size(0) // 2
        chosen, rejected = [], []
        for i in range(pairs):
            pair = _trim(_pair_slice(inputs, i, pairs))
            c, r = super().compute_ref_log_probs(self._policy(model, pair), pair)
            chosen.append(c)
            rejected.append(r)
        return torch.cat(chosen), torch.cat(rejected)

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        weights = inputs.pop(WEIGHT_KEY, None)
        if weights is None:
            return super()._compute_loss(model, inputs, return_outputs)
        pairs = weights.size(0)
        losses = []
        if getattr(self.args, "share_prompt", False) or self.aux_loss_enabled:
            for i in range(pairs):
                pair = _trim(_pair_slice(inputs, i, pairs))
                losses.append(super()._compute_loss(self._policy(model, pair), pair, False))
        else:  # one forward for the batch; TRL's loss code per pair on its rows
            once = _BatchOnce(model, inputs, pairs)
            for i in range(pairs):
                losses.append(super()._compute_loss(once, _pair_slice(inputs, i, pairs), False))
        loss = (torch.stack(losses) * weights.to(losses[0].device)).mean()
        return (loss, {}) if return_outputs else loss


def pair_weights(pairs: list[PreferencePair], weighting: str, path: Path) -> list[float]:
    """Per-pair weights: a named column (by default ``weight``, what ``pairs`` wrote), PersoDPO's
    sigmoid of the score gap recomputed from the scores, or all ones."""
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
            "weight_norm": config.weight_norm,
            "pairs": len(kept),
            "pairs_used": used,
            "dropped_identical": identical,
        }

    method_args = {
        "beta": config.beta,
        "precompute_ref_log_probs": config.precompute_ref,
        "share_prompt": memory_settings(config)[1],
        "weight_column": "weight",
        "weight_norm": config.weight_norm,
    }
    return train_rows(
        config, resume, load, WeightedDPOTrainer, WeightedDPOConfig, method_args, describe,
        extra_callbacks,
    )  # fmt: skip
