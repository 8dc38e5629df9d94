"""Slot decoding: continuous batching for a local causal LM on a CPU.

``model.generate`` on a padded batch keeps decoding until the batch's longest reply ends, so
rows that finished early still cost a forward each step, and its growing key/value cache is
re-concatenated on every step (a quarter of a batch-8 decode step on CPU, profiled). Here each
of ``batch_size`` slots holds one prompt at a time in a preallocated key/value buffer: a slot
whose reply ends takes the next prompt at once, so every decode step works on live rows only.
Each prompt is prefilled on its own (no padding) after the token prefix shared by every prompt
of the call — the PersoBench instructions — has been run once and copied in. ``SlotBatch``
takes prompts one at a time between steps, so a server can feed it requests as they arrive;
``slot_generate`` feeds it a list.

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
from collections import deque
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
LOOKUP_LIMIT = 200_000  # n-grams of finished replies kept for guesses (~40 MB)

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
    """Where each slot's next keys/values go (its length so far), how many slots the current
    step feeds (the first ``count``), how many tokens each is fed, and the live width.

    ``lengths`` stays on the CPU (read as Python ints every step); ``slots`` and ``columns``,
    the cache cells this step writes, are set per step on the model's device."""

    def __init__(self) -> None:
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.count = 0
        self.fed = 1
        self.slots = self.columns = torch.zeros(0, dtype=torch.long)

    @property
    def width(self) -> int:
        return int(self.lengths[: self.count].max()) + self.fed


class _SlotLayer(DynamicLayer):
    """One layer's keys and values for all slots; slot ``b`` holds its tokens at columns
    ``0 .. lengths[b] - 1`` and each decode step writes ``fed`` columns per fed slot, in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: _Rows) -> None:
        super().__init__()
        self.keys, self.values, self.rows = keys, values, rows
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        count, slots, columns = self.rows.count, self.rows.slots, self.rows.columns
        self.keys[slots, :, columns] = key_states.transpose(1, 2)
        self.values[slots, :, columns] = value_states.transpose(1, 2)
        width = self.rows.width
        return self.keys[:count, :, :width], self.values[:count, :, :width]

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
    """Rows of preallocated keys/values and one decode step over the first rows; ``reserve``
    makes room for more rows or longer ones, keeping what the rows hold."""

    def __init__(self, model: Any, slots: int = 0, capacity: int = 0) -> None:
        probe = DynamicCache(config=model.config)  # learns each layer's head count and size
        with torch.inference_mode():
            model(torch.zeros((1, 1), dtype=torch.long, device=model.device), past_key_values=probe)
        self.model = model
        self.rows = _Rows()
        self.layers = [
            _SlotLayer(layer.keys[:0, :, :0], layer.values[:0, :, :0], self.rows)
            for layer in probe.layers
        ]
        self.cache = Cache(layers=self.layers)
        self.dtype = next(model.parameters()).dtype
        self.reserve(slots, capacity)

    @property
    def slots(self) -> int:
        return self.layers[0].keys.shape[0]

    @property
    def capacity(self) -> int:
        return self.layers[0].keys.shape[2]

    def reserve(self, slots: int, capacity: int) -> None:
        """At least ``slots`` rows of ``capacity`` tokens each (zeros: masked columns must not
        hold NaNs, which a zero attention weight would still spread)."""
        if slots <= self.slots and capacity <= self.capacity:
            return
        slots, capacity = max(slots, self.slots), max(capacity, self.capacity)
        used = int(self.rows.lengths.max()) if self.slots else 0
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_zeros((slots, old.shape[1], capacity, old.shape[3]))
                new[: old.shape[0], :, :used] = old[:, :, :used]
                setattr(layer, name, new)
        lengths = torch.zeros(slots, dtype=torch.long)
        lengths[: len(self.rows.lengths)] = self.rows.lengths
        self.rows.lengths = lengths

    def load(self, slot: int, prefill: DynamicCache, length: int) -> None:
        """Copy a prompt's prefilled keys/values into ``slot``."""
        for layer, filled in zip(self.layers, prefill.layers, strict=True):
            layer.keys[slot, :, :length] = filled.keys[0]
            layer.values[slot, :, :length] = filled.values[0]
        self.rows.lengths[slot] = length

    def compact(self, slots: list[int]) -> None:
        """Move the rows ``slots`` (ascending) to the front, in that order."""
        for target, source in enumerate(slots):
            if source != target:
                length = int(self.rows.lengths[source])
                for layer in self.layers:
                    layer.keys[target, :, :length] = layer.keys[source, :, :length]
                    layer.values[target, :, :length] = layer.values[source, :, :length]
                self.rows.lengths[target] = length

    def step(self, tokens: list[list[int]]) -> torch.Tensor:
        """Feed each of the first ``len(tokens)`` slots the same number of tokens (its latest,
        then any guesses); the next-token logits after each fed token, ``(slots, fed,
        vocabulary)``. The slots' lengths stay put until ``advance`` says how many fed tokens
        each keeps."""
        device = self.model.device
        self.rows.count = count = len(tokens)
        self.rows.fed = fed = len(tokens[0])
        positions = self.rows.lengths[:count, None] + torch.arange(fed)
        self.rows.slots = torch.arange(count, device=device)[:, None]
        self.rows.columns = positions.to(device)
        visible = torch.arange(self.rows.width)[None, None, :] <= positions[:, :, None]
        mask = torch.zeros(visible.shape, dtype=self.dtype)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        out = self.model(
            input_ids=torch.tensor(tokens, device=device),
            attention_mask=mask[:, None].to(device),
            position_ids=self.rows.columns,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=fed,
        )
        return out.logits.float().cpu()

    def advance(self, kept: list[int]) -> None:
        """Each fed slot keeps the keys/values of its first ``kept`` fed tokens; later columns
        are overwritten by the next step."""
        self.rows.lengths[: len(kept)] += torch.tensor(kept, dtype=torch.long)
        self.rows.fed = 1


def _ngrams_ending_at(tokens: Sequence[int], end: int) -> Iterator[tuple[int, ...]]:
    return (tuple(tokens[end + 1 - n : end + 1]) for n in NGRAMS if end + 1 >= n)


class _Replies:
    """What followed each n-gram in the replies generated so far, over all prompts: replies to
    different dialogues share their JSON frame and many turns of phrase. A server keeps one for
    its lifetime, so it starts afresh past ``LOOKUP_LIMIT`` n-grams."""

    def __init__(self) -> None:
        self.after: dict[tuple[int, ...], list[int]] = {}

    def add(self, tokens: list[int], most: int) -> None:
        if len(self.after) > LOOKUP_LIMIT:
            self.after.clear()
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


class Row:
    """A prompt in a slot: the caller's ``key``, its token budget, the tokens generated so far
    and the compute seconds spent on it; ``done`` once an end token or the budget is reached."""

    def __init__(self, key: Any, budget: int, lookup: _Lookup | None) -> None:
        self.key, self.budget, self.lookup = key, budget, lookup
        self.tokens: list[int] = []
        self.seconds = 0.0
        self.done = False


class SlotBatch:
    """Prompts decoding together, one per slot. A prompt joins between steps (``add``:
    prefilled alone, after the prefix set by ``set_prefix`` when it starts with it) and leaves
    when its reply ends or its caller ``drop``s it; ``step`` advances every row at once.

    Rows and their length grow as prompts need, up to ``slots`` rows. Use it inside
    ``torch.inference_mode()`` and ``with batch:`` (which sets the packed attention).
    """

    def __init__(
        self,
        model: Any,
        slots: int,
        *,
        eos_ids: set[int],
        guesses: int = 4,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        capacity: int = 0,
    ) -> None:
        self.model, self.slots, self.eos_ids = model, slots, eos_ids
        self.guesses = guesses if temperature <= 0 else 0
        self.temperature = temperature
        self.decoder = SlotDecoder(model, slots if capacity else 0, capacity)
        self.live: list[Row | None] = []  # the row in each slot in use; None: free again
        self.replies = _Replies() if self.guesses else None
        self.prefix: list[int] = []
        self._shared = DynamicCache(config=model.config)
        self._warp = LogitsProcessorList()
        if temperature > 0:  # what ``generate`` applies: temperature, top-p, the model's top-k
            self._warp.append(TemperatureLogitsWarper(temperature))
            if model.generation_config.top_k:
                self._warp.append(TopKLogitsWarper(model.generation_config.top_k))
            self._warp.append(TopPLogitsWarper(top_p))
        self._generator = torch.Generator().manual_seed(seed)
        self._restore: str | None = None

    def __enter__(self) -> SlotBatch:
        self._restore = self.model.config._attn_implementation
        supports = getattr(self.model, "_supports_attention_backend", False)
        if self.guesses and self._restore == "sdpa" and supports:
            # others keep their own attention: several tokens per row are still right, only slower
            self.model.set_attn_implementation(ATTENTION)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._restore is not None and self.model.config._attn_implementation != self._restore:
            self.model.set_attn_implementation(self._restore)

    @property
    def busy(self) -> int:
        """Rows decoding."""
        return sum(row is not None for row in self.live)

    @property
    def free(self) -> int:
        """Prompts that can join now."""
        return self.slots - self.busy

    def set_prefix(self, tokens: Sequence[int]) -> None:
        """Compute the keys/values of ``tokens`` once; prompts starting with them reuse them."""
        self.prefix = list(tokens)
        self._shared = DynamicCache(config=self.model.config)
        device = self.model.device
        self.model(torch.tensor([self.prefix], device=device), past_key_values=self._shared)

    def add(self, key: Any, prompt: Sequence[int], max_new_tokens: int) -> Row:
        """Prefill ``prompt`` into a free slot and pick its first token; a row that is already
        ``done`` (one-token budget, an end token) leaves the slot free."""
        began = time.perf_counter()
        start = len(self.prefix)
        if len(prompt) <= start or list(prompt[:start]) != self.prefix:
            start = 0
        cache = DynamicCache(config=self.model.config)
        for number, layer in enumerate(self._shared.layers if start else []):
            cache.update(layer.keys, layer.values, number)  # copied: update concatenates
        device = self.model.device
        out = self.model(
            torch.tensor([list(prompt[start:])], device=device),
            position_ids=torch.arange(start, len(prompt), device=device)[None, :],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        slot = next((s for s, row in enumerate(self.live) if row is None), len(self.live))
        if slot == len(self.live):
            self.live.append(None)
        rows = self.decoder.slots
        if len(self.live) > rows:  # grow by doubling: each growth copies the rows
            rows = min(self.slots, max(len(self.live), 2 * rows))
        self.decoder.reserve(rows, _rounded(len(prompt) + max_new_tokens + self.guesses))
        self.decoder.load(slot, cache, len(prompt))
        row = Row(key, max_new_tokens, _Lookup(prompt, self.replies) if self.guesses else None)
        self._push(row, self._choose(out.logits[:, -1, :].float().cpu())[0])
        row.seconds = time.perf_counter() - began
        if not row.done:
            self.live[slot] = row
        return row

    def drop(self, row: Row) -> None:
        """Free ``row``'s slot (its caller no longer wants the reply)."""
        self.live[self.live.index(row)] = None

    def step(self) -> list[Row]:
        """One decode step of every row; the rows, each with the tokens it kept appended (a row
        whose reply ended is ``done`` and its slot free)."""
        slots = [slot for slot, row in enumerate(self.live) if row is not None]
        if slots != list(range(len(slots))):
            self.decoder.compact(slots)
        rows = [row for row in self.live if row is not None]
        self.live = list(rows)
        drafts = [
            row.lookup.guess(min(self.guesses, row.budget - len(row.tokens) - 1))
            if row.lookup is not None
            else []
            for row in rows
        ]
        fed = 1 + max(len(d) for d in drafts)
        began = time.perf_counter()
        logits = self.decoder.step(
            [
                [row.tokens[-1], *d, *[row.tokens[-1]] * (fed - 1 - len(d))]
                for row, d in zip(rows, drafts, strict=True)
            ]
        )
        flat = self._choose(logits.flatten(0, 1))  # one call for every row and fed token
        picked = [flat[row * fed : (row + 1) * fed] for row in range(len(rows))]
        kept = []
        for draft, chosen in zip(drafts, picked, strict=True):
            right = 0
            while right < len(draft) and draft[right] == chosen[right]:
                right += 1
            kept.append(right + 1)
        self.decoder.advance(kept)
        share = (time.perf_counter() - began) / len(rows)
        for slot, (row, chosen, keep) in enumerate(zip(rows, picked, kept, strict=True)):
            row.seconds += share
            for token in chosen[:keep]:
                self._push(row, token)
                if row.done:
                    self.live[slot] = None
                    break
        return rows

    def _push(self, row: Row, token: int) -> None:
        row.tokens.append(token)
        if row.lookup is not None:
            row.lookup.push(token)
        row.done = token in self.eos_ids or len(row.tokens) >= row.budget
        if row.done and self.replies is not None:
            self.replies.add(row.tokens, self.guesses)

    def _choose(self, logits: torch.Tensor) -> list[int]:
        if self.temperature <= 0:
            return logits.argmax(dim=-1).tolist()
        probs = torch.softmax(self._warp(None, logits), dim=-1)
        return torch.multinomial(probs, 1, generator=self._generator)[:, 0].tolist()


def _rounded(tokens: int, block: int = 256) -> int:
    """``tokens`` rounded up to whole blocks, so that slightly longer prompts do not each
    reallocate every row."""
    return -(-tokens // block) * block


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
    prefix = shared_prefix(prompts) if len(prompts) > 1 else 0
    guesses = guesses if temperature <= 0 else 0
    batch = SlotBatch(
        model,
        min(slots, len(prompts)),
        eos_ids=eos_ids,
        guesses=guesses,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        capacity=max(len(p) for p in prompts) + max_new_tokens + guesses,
    )
    waiting = deque(range(len(prompts)))
    with torch.inference_mode(), batch:
        if prefix >= MIN_SHARED_PREFIX:
            batch.set_prefix(prompts[0][:prefix])
        while waiting or batch.busy:
            while waiting and batch.free:
                index = waiting.popleft()
                row = batch.add(index, prompts[index], max_new_tokens)
                if row.done:
                    yield index, row.tokens, row.seconds
            for row in batch.step() if batch.busy else []:
                if row.done:
                    yield row.key, row.tokens, row.seconds
