"""The ``hf`` responder: a local transformers causal LM, batched greedy generation.

Prompts go through the model's own chat template and are taken in length order. Models whose
layers all use full attention (Llama, Qwen2, SmolLM2, ...) decode through ``slots``: up to
``batch_size`` prompts at once, a finished reply's slot taking the next prompt at once. Other
models fall back to ``model.generate`` on left-padded batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from persona_align import devices
from persona_align.errors import InputError
from persona_align.generation.base import (
    GenerationParams,
    OnResult,
    Request,
    Responder,
    Result,
    register_responder,
)
from persona_align.models import DTYPES, load_causal_lm, model_dir, model_version, resolve
from persona_align.prompting import render_chat
from persona_align.records import Message


@register_responder("hf")
class HFResponder(Responder):
    kind = "hf"

    def __init__(
        self,
        model: str = "embedded",
        dtype: str = "auto",
        batch_size: int = 8,
        name: str | None = None,
        guesses: int = 4,
    ) -> None:
        if dtype not in DTYPES:
            raise InputError(None, f"hf dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise InputError(None, f"hf batch_size must be at least 1, got {batch_size}")
        if not isinstance(guesses, int) or guesses < 0:
            raise InputError(None, f"hf guesses must be an integer 0 or more, got {guesses!r}")
        resolved = resolve(model)  # fails now, with one line, for an unknown model
        super().__init__(
            name
            or (resolved.embedded.hub_id.split("/")[-1] if resolved.embedded else Path(model).name)
        )
        self.model_name = model
        self.dtype = dtype
        self.batch_size = batch_size
        self.guesses = guesses  # not in settings(): guesses change the speed, never the replies
        self._model: Any = None
        self._tokenizer: Any = None

    def settings(self) -> dict[str, Any]:
        version = model_version(self.model_name)
        return {
            "kind": self.kind,
            "model": self.model_name,
            "version": version,
            "dtype": devices.dtype_for(self.dtype),  # the replies differ by dtype
        }

    def prepare(self) -> None:
        if self._model is None:
            model_dir(self.model_name)
            self._model, self._tokenizer = load_causal_lm(self.model_name, self.dtype)

    def generate(
        self, requests: list[Request], params: GenerationParams, on_result: OnResult
    ) -> None:
        self.prepare()
        prompts = [r.messages for r in requests]
        for index, result in iter_generate(
            self._model, self._tokenizer, prompts, params, self.batch_size, self.guesses
        ):
            on_result(requests[index], result)


def iter_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[Message]],
    params: GenerationParams,
    batch_size: int = 8,
    guesses: int = 4,
) -> Iterator[tuple[int, Result]]:
    """``(prompt index, raw completion)`` as each reply finishes, through the model's chat
    template, cut at the first end-of-turn token (slot decoding where ``slots.supported``,
    checking up to ``guesses`` looked-up tokens per slot and step when greedy).

    A tokenizer without a pad token gets its EOS token as one.
    """
    import torch

    from persona_align.generation import slots

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [render_chat(tokenizer, p) for p in prompts]
    if not texts:
        return
    token_ids = tokenizer(texts, add_special_tokens=False).input_ids
    lengths = [len(ids) for ids in token_ids]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}

    def result(index: int, tokens: list[int], seconds: float) -> Result:
        end = next((k + 1 for k, t in enumerate(tokens) if t in eos_ids), len(tokens))
        return Result(
            raw=tokenizer.decode(tokens[:end], skip_special_tokens=True),
            latency_s=seconds,
            usage={"prompt_tokens": lengths[index], "completion_tokens": end},
        )

    if slots.supported(model, max(lengths) + params.max_new_tokens):
        for position, tokens, seconds in slots.slot_generate(
            model,
            [token_ids[i] for i in order],
            max_new_tokens=params.max_new_tokens,
            eos_ids=eos_ids,
            slots=batch_size,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            guesses=guesses,
        ):
            yield order[position], result(order[position], tokens, seconds)
        return
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
        if params.temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    torch.manual_seed(params.seed)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # every row's new tokens start at the same position
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in batch],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(model.device)
            began = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    max_new_tokens=params.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    **sampling,
                )
            per_item = (time.perf_counter() - began) / len(batch)
            new_tokens = out[:, enc["input_ids"].shape[1] :].tolist()
            for row, index in enumerate(batch):
                yield index, result(index, new_tokens[row], per_item)
    finally:
        tokenizer.padding_side = padding_side


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[Message]],
    params: GenerationParams,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[Result]:
    """Raw completions of chat prompts, in order, over a model already in memory (a server,
    a method's own generation, a benchmark loop); ``on_batch`` hears of each finished reply."""
    results: list[Result | None] = [None] * len(prompts)
    for index, result in iter_generate(model, tokenizer, prompts, params, batch_size):
        results[index] = result
        if on_batch is not None:
            on_batch(1)
    return [r for r in results if r is not None]
