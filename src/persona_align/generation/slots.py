"""Slot decoding: continuous batching for a local causal LM on a CPU.

``model.generate`` on a padded batch keeps decoding until the batch's longest reply ends, so
rows that finished early still cost a forward each step, and its growing key/value cache is
re-concatenated on every step (a quarter of a batch-8 decode step on CPU, profiled). Here each
of ``batch_size`` slots holds one prompt at a time in a preallocated key/value buffer: a slot
whose reply ends takes the next prompt at once, so every decode step works on live rows only.
Each prompt is prefilled on its own (no padding) after the token prefix shared by every prompt
of the call — the PersoBench instructions — has been run once and copied in.

Rows never interact: each attends only to its own columns of the buffer (a per-row mask), and
its positions count from its own first token, so a reply is the one the model gives alone up
to floating-point summation order. transformers' own continuous batching
(``model.generate_batch``) exists but took 8.5 s per FoCus prompt on this 2-core CPU, slower
than generating one prompt at a time (4.8 s).

Only decoder-only models whose layers all use full attention are eligible (``supported``);
anything else (sliding windows shorter than the sequence, linear-attention or recurrent layers,
extra logits processors in the model's generation config) goes through ``model.generate``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from persona_align.prompting import MIN_SHARED_PREFIX, shared_prefix

# generation-config fields whose non-default values add logits processors we do not replicate
_UNSUPPORTED = {
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_repetition_penalty": (None, 1.0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "sequence_bias": (None,),
}


def supported(model: Any, longest: int) -> bool:
    """Whether slot decoding gives what ``model.generate`` would for sequences up to ``longest``."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return False
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return False
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and getattr(config, "use_sliding_window", True)
    if uses_window and longest > window:
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        return False
    if "sliding_attention" in layer_types and (window is None or longest > window):
        return False
    generation = model.generation_config
    return all(getattr(generation, key, None) in ok for key, ok in _UNSUPPORTED.items())


class _Rows:
    """Where each slot's next key/value goes (its length so far) and the live width."""

    def __init__(self, slots: int) -> None:
        self.lengths = torch.zeros(slots, dtype=torch.long)

    @property
    def width(self) -> int:
        return int(self.lengths.max()) + 1


class _SlotLayer(DynamicLayer):
    """One layer's keys and values for all slots; slot ``b`` holds its tokens at columns
    ``0 .. lengths[b] - 1`` and each decode step writes one column per slot, in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: _Rows) -> None:
        super().__init__()
        self.keys, self.values, self.rows = keys, values, rows
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slots = torch.arange(self.keys.shape[0])
        self.keys[slots, :, self.rows.lengths] = key_states[:, :, 0]
        self.values[slots, :, self.rows.lengths] = value_states[:, :, 0]
        width = self.rows.width
        return self.keys[:, :, :width], self.values[:, :, :width]

    def get_seq_length(self) -> int:
        return self.rows.width - 1


class SlotDecoder:
    """``slots`` rows of preallocated keys/values and one decode step over all of them."""

    def __init__(self, model: Any, slots: int, capacity: int) -> None:
        probe = DynamicCache(config=model.config)  # learns each layer's head count and size
        with torch.inference_mode():
            model(torch.zeros((1, 1), dtype=torch.long, device=model.device), past_key_values=probe)
        self.model, self.slots = model, slots
        self.rows = _Rows(slots)
        self.layers = [
            _SlotLayer(
                layer.keys.new_zeros((slots, layer.keys.shape[1], capacity, layer.keys.shape[3])),
                layer.values.new_zeros(
                    (slots, layer.values.shape[1], capacity, layer.values.shape[3])
                ),
                self.rows,
            )
            for layer in probe.layers
        ]
        self.cache = Cache(layers=self.layers)
        self.dtype = next(model.parameters()).dtype

    def load(self, slot: int, prefill: DynamicCache, length: int) -> None:
        """Copy a prompt's prefilled keys/values into ``slot``."""
        for layer, filled in zip(self.layers, prefill.layers, strict=True):
            layer.keys[slot, :, :length] = filled.keys[0]
            layer.values[slot, :, :length] = filled.values[0]
        self.rows.lengths[slot] = length

    def keep(self, slots: list[int]) -> None:
        """Drop every slot not in ``slots`` (the tail of a run, when no prompt is left)."""
        index = torch.tensor(slots, dtype=torch.long)
        for layer in self.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.rows.lengths = self.rows.lengths.index_select(0, index)

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed each slot its latest token; the next-token logits of every slot."""
        device = self.model.device
        visible = torch.arange(self.rows.width)[None, :] <= self.rows.lengths[:, None]
        mask = torch.zeros(visible.shape, dtype=self.dtype)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        out = self.model(
            input_ids=torch.tensor(tokens, device=device)[:, None],
            attention_mask=mask[:, None, None, :].to(device),
            position_ids=self.rows.lengths[:, None].to(device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.rows.lengths += 1
        return out.logits[:, -1, :].float().cpu()


class _Row:
    """A prompt in a slot: its index, the tokens generated so far, compute seconds spent."""

    def __init__(self, index: int, token: int, seconds: float) -> None:
        self.index, self.tokens, self.seconds = index, [token], seconds


def slot_generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: set[int],
    slots: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Iterator[tuple[int, list[int], float]]:
    """``(prompt index, new tokens up to and including the first end token, compute seconds
    attributed to it)`` as each reply ends; prompts enter the slots in the given order."""
    if not prompts:
        return
    device = model.device
    prefix = shared_prefix(prompts) if len(prompts) > 1 else 0
    prefix = prefix if prefix >= MIN_SHARED_PREFIX else 0
    decoder = SlotDecoder(
        model, min(slots, len(prompts)), max(len(p) for p in prompts) + max_new_tokens
    )
    warp = LogitsProcessorList()
    if temperature > 0:  # what ``generate`` applies: our temperature and top-p, the model's top-k
        warp.append(TemperatureLogitsWarper(temperature))
        if model.generation_config.top_k:
            warp.append(TopKLogitsWarper(model.generation_config.top_k))
        warp.append(TopPLogitsWarper(top_p))
    generator = torch.Generator().manual_seed(seed)

    def choose(logits: torch.Tensor) -> list[int]:
        if temperature <= 0:
            return logits.argmax(dim=-1).tolist()
        probs = torch.softmax(warp(None, logits), dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()

    def done(tokens: list[int]) -> bool:
        return tokens[-1] in eos_ids or len(tokens) >= max_new_tokens

    queue = iter(range(len(prompts)))
    finished: list[tuple[int, list[int], float]] = []
    live: list[_Row | None] = [None] * decoder.slots
    shared = DynamicCache(config=model.config)

    def admit(slot: int) -> None:
        """Prefill the next prompt into ``slot`` (None when the queue is empty)."""
        for index in queue:
            began = time.perf_counter()
            cache = DynamicCache(config=model.config)
            for number, layer in enumerate(shared.layers if prefix else []):
                cache.update(layer.keys, layer.values, number)  # copied: update concatenates
            prompt = prompts[index]
            out = model(
                torch.tensor([prompt[prefix:]], device=device),
                position_ids=torch.arange(prefix, len(prompt), device=device)[None, :],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            decoder.load(slot, cache, len(prompt))
            token = choose(out.logits[:, -1, :].float().cpu())[0]
            row = _Row(index, token, time.perf_counter() - began)
            if not done(row.tokens):
                live[slot] = row
                return
            finished.append((row.index, row.tokens, row.seconds))
        live[slot] = None

    with torch.inference_mode():
        if prefix:
            model(torch.tensor([prompts[0][:prefix]], device=device), past_key_values=shared)
        for slot in range(decoder.slots):
            admit(slot)
        while True:
            yield from finished
            finished.clear()
            active = [slot for slot, row in enumerate(live) if row is not None]
            if not active:
                return
            if len(active) < len(live):  # the queue is empty: shrink to the rows still going
                decoder.keep(active)
                live = [live[slot] for slot in active]
            rows = [row for row in live if row is not None]
            began = time.perf_counter()
            logits = decoder.step([row.tokens[-1] for row in rows])
            share = (time.perf_counter() - began) / len(rows)
            for slot, (row, token) in enumerate(zip(rows, choose(logits), strict=True)):
                row.tokens.append(token)
                row.seconds += share
                if done(row.tokens):
                    finished.append((row.index, row.tokens, row.seconds))
                    admit(slot)
