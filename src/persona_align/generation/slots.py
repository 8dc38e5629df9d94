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
to floating-point summation order.

A decode step reads every weight matrix once whatever the number of rows, so it costs much the
same for one token per row as for a few (on a 2-core CPU, 44 ms for 8 tokens, 65 ms for 40).
Greedy decoding uses that: each slot also feeds up to ``guesses`` tokens looked up from its
prompt and from finished replies (prompt-lookup decoding), and keeps them only as far as they
are the tokens the model picks after them, so every reply stays the model's own greedy reply.

transformers' own continuous batching (``model.generate_batch``) exists but took 8.5 s per
FoCus prompt on a 2-core CPU, slower than generating one prompt at a time (4.8 s).

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
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from persona_align.prompting import MIN_SHARED_PREFIX, shared_prefix

ATTENTION = "persona_align_slots"
NGRAMS = (3, 2, 1)  # n-gram lengths a guess is looked up by, longest first

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
    """Where each slot's next keys/values go (its length so far), how many tokens each slot is
    fed in the current step, and the live width."""

    def __init__(self, slots: int) -> None:
        self.lengths = torch.zeros(slots, dtype=torch.long)
        self.fed = 1

    @property
    def width(self) -> int:
        return int(self.lengths.max()) + self.fed


class _SlotLayer(DynamicLayer):
    """One layer's keys and values for all slots; slot ``b`` holds its tokens at columns
    ``0 .. lengths[b] - 1`` and each decode step writes ``fed`` columns per slot, in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: _Rows) -> None:
        super().__init__()
        self.keys, self.values, self.rows = keys, values, rows
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slots = torch.arange(self.keys.shape[0])[:, None]
        columns = self.rows.lengths[:, None] + torch.arange(key_states.shape[2])
        self.keys[slots, :, columns] = key_states.transpose(1, 2)
        self.values[slots, :, columns] = value_states.transpose(1, 2)
        width = self.rows.width
        return self.keys[:, :, :width], self.values[:, :, :width]

    def get_seq_length(self) -> int:
        return self.rows.width - self.rows.fed


def _packed_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA for several masked query tokens per row without copying grouped key/value heads.

    transformers repeats each key/value head for its query heads (a copy of the whole cache
    every layer) whenever a mask is given and more than one query token is fed; here the query
    heads of a group are stacked along the query axis instead — the same products, read once.
    """
    groups = query.shape[1] // key.shape[1]
    tokens = query.shape[2]
    extras = any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "s_aux", "sinks"))
    if attention_mask is None or tokens == 1 or groups == 1 or extras:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    batch, heads, _, dim = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, key.shape[1], groups * tokens, dim),
        key,
        value,
        attn_mask=attention_mask.repeat(1, 1, groups, 1),
        scale=kwargs.get("scaling"),
    )
    return out.reshape(batch, heads, tokens, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _packed_attention)
AttentionMaskInterface.register(ATTENTION, AttentionMaskInterface._global_mapping["sdpa"])


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

    def step(self, tokens: list[list[int]]) -> torch.Tensor:
        """Feed each slot the same number of tokens (its latest, then any guesses); the
        next-token logits after each fed token, ``(slots, fed, vocabulary)``. The slots'
        lengths stay put until ``advance`` says how many fed tokens each keeps."""
        device = self.model.device
        self.rows.fed = fed = len(tokens[0])
        positions = self.rows.lengths[:, None] + torch.arange(fed)
        visible = torch.arange(self.rows.width)[None, None, :] <= positions[:, :, None]
        mask = torch.zeros(visible.shape, dtype=self.dtype)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        out = self.model(
            input_ids=torch.tensor(tokens, device=device),
            attention_mask=mask[:, None].to(device),
            position_ids=positions.to(device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=fed,
        )
        return out.logits.float().cpu()

    def advance(self, kept: list[int]) -> None:
        """Each slot keeps the keys/values of its first ``kept`` fed tokens; later columns are
        overwritten by the next step."""
        self.rows.lengths += torch.tensor(kept, dtype=torch.long)
        self.rows.fed = 1


def _ngrams_ending_at(tokens: Sequence[int], end: int) -> Iterator[tuple[int, ...]]:
    return (tuple(tokens[end + 1 - n : end + 1]) for n in NGRAMS if end + 1 >= n)


class _Replies:
    """What followed each n-gram in the replies generated so far, over all prompts: replies to
    different dialogues share their JSON frame and many turns of phrase."""

    def __init__(self) -> None:
        self.after: dict[tuple[int, ...], list[int]] = {}

    def add(self, tokens: list[int], most: int) -> None:
        for end in range(len(tokens) - 1):
            follower = tokens[end + 1 : end + 1 + most]
            for key in _ngrams_ending_at(tokens, end):
                self.after[key] = follower


class _Lookup:
    """Guesses how a reply goes on by finding its last few tokens earlier in the prompt or the
    reply and copying what followed (prompt-lookup decoding): persona replies reuse phrases of
    the persona and the dialogue, and their own JSON frame."""

    def __init__(self, prompt: Sequence[int], replies: _Replies | None = None) -> None:
        self.tokens = list(prompt)
        self.replies = replies
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest follower is
        for end in range(len(self.tokens) - 1):
            self._index(end)

    def _index(self, end: int) -> None:
        for key in _ngrams_ending_at(self.tokens, end):
            self.after[key] = end + 1

    def push(self, token: int) -> None:
        self.tokens.append(token)
        self._index(len(self.tokens) - 2)

    def guess(self, most: int) -> list[int]:
        if most <= 0:
            return []
        for n in NGRAMS:
            key = tuple(self.tokens[-n:])
            at = self.after.get(key)
            if at is not None:
                return self.tokens[at : at + most]
            if self.replies is not None and key in self.replies.after:
                return self.replies.after[key][:most]
        return []


class _Row:
    """A prompt in a slot: its index, the tokens generated so far, compute seconds spent."""

    def __init__(self, index: int, lookup: _Lookup | None, token: int, seconds: float) -> None:
        self.index, self.lookup, self.tokens, self.seconds = index, lookup, [token], seconds
        if lookup is not None:
            lookup.push(token)


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
    guesses: int = 4,
) -> Iterator[tuple[int, list[int], float]]:
    """``(prompt index, new tokens up to and including the first end token, compute seconds
    attributed to it)`` as each reply ends; prompts enter the slots in the given order.

    Greedy decoding checks up to ``guesses`` looked-up next tokens per slot in the same step
    (kept only while they are what the model itself picks, so replies do not change); a step
    that feeds several tokens per row reads every weight once for all of them.
    """
    if not prompts:
        return
    device = model.device
    prefix = shared_prefix(prompts) if len(prompts) > 1 else 0
    prefix = prefix if prefix >= MIN_SHARED_PREFIX else 0
    guesses = guesses if temperature <= 0 else 0
    decoder = SlotDecoder(
        model,
        min(slots, len(prompts)),
        max(len(p) for p in prompts) + max_new_tokens + guesses,
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
    replies = _Replies() if guesses else None

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
            row = _Row(
                index,
                _Lookup(prompt, replies) if guesses else None,
                token,
                time.perf_counter() - began,
            )
            if not done(row.tokens):
                live[slot] = row
                return
            finished.append((row.index, row.tokens, row.seconds))
        live[slot] = None

    restore = model.config._attn_implementation
    if guesses and restore == "sdpa" and getattr(model, "_supports_attention_backend", False):
        # others keep their own attention: several tokens per row are still right, only slower
        model.set_attn_implementation(ATTENTION)
    try:
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
                drafts = [
                    row.lookup.guess(min(guesses, max_new_tokens - len(row.tokens) - 1))
                    if row.lookup is not None
                    else []
                    for row in rows
                ]
                fed = 1 + max(len(d) for d in drafts)
                began = time.perf_counter()
                logits = decoder.step(
                    [
                        [row.tokens[-1], *d, *[row.tokens[-1]] * (fed - 1 - len(d))]
                        for row, d in zip(rows, drafts, strict=True)
                    ]
                )
                flat = choose(logits.flatten(0, 1))  # one call for every row and fed token
                picked = [flat[row * fed : (row + 1) * fed] for row in range(len(rows))]
                kept = []
                for draft, chosen in zip(drafts, picked, strict=True):
                    right = 0
                    while right < len(draft) and draft[right] == chosen[right]:
                        right += 1
                    kept.append(right + 1)
                decoder.advance(kept)
                share = (time.perf_counter() - began) / len(rows)
                for slot, (row, chosen, keep) in enumerate(zip(rows, picked, kept, strict=True)):
                    row.seconds += share
                    for token in chosen[:keep]:
                        row.tokens.append(token)
                        if row.lookup is not None:
                            row.lookup.push(token)
                        if done(row.tokens):
                            finished.append((row.index, row.tokens, row.seconds))
                            if replies is not None:
                                replies.add(row.tokens, guesses)
                            admit(slot)
                            break
    finally:
        if model.config._attn_implementation != restore:
            model.set_attn_implementation(restore)
