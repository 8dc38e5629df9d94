"""The ``hf`` responder: a local transformers causal LM, batched greedy generation.

Prompts go through the model's own chat template; batches are formed from length-sorted
prompts with left padding, so little compute is spent on padding and every row's new tokens
start at the same position.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

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


@register_responder("hf")
class HFResponder(Responder):
    kind = "hf"

    def __init__(
        self,
        model: str = "embedded",
        dtype: str = "float32",
        batch_size: int = 8,
        name: str | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise InputError(None, f"hf dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise InputError(None, f"hf batch_size must be at least 1, got {batch_size}")
        resolved = resolve(model)  # fails now, with one line, for an unknown model
        super().__init__(
            name
            or (resolved.embedded.hub_id.split("/")[-1] if resolved.embedded else Path(model).name)
        )
        self.model_name = model
        self.dtype = dtype
        self.batch_size = batch_size
        self._model: Any = None
        self._tokenizer: Any = None

    def settings(self) -> dict[str, Any]:
        version = model_version(self.model_name)
        return {
            "kind": self.kind,
            "model": self.model_name,
            "version": version,
            "dtype": self.dtype,
        }

    def prepare(self) -> None:
        if self._model is None:
            model_dir(self.model_name)
            self._model, self._tokenizer = load_causal_lm(self.model_name, self.dtype)
            self._tokenizer.padding_side = "left"
            if self._tokenizer.pad_token is None:
                self._tokenizer.pad_token = self._tokenizer.eos_token

    def generate(
        self, requests: list[Request], params: GenerationParams, on_result: OnResult
    ) -> None:
        import torch

        self.prepare()
        tokenizer, model = self._tokenizer, self._model
        texts = [render_chat(tokenizer, r.messages) for r in requests]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
        order = sorted(range(len(requests)), key=lambda i: lengths[i])
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
            if params.temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        torch.manual_seed(params.seed)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            enc = tokenizer(
                [texts[i] for i in batch],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
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
                tokens = new_tokens[row]
                completion = next(
                    (k + 1 for k, t in enumerate(tokens) if t in eos_ids), len(tokens)
                )
                on_result(
                    requests[index],
                    Result(
                        raw=tokenizer.decode(tokens[:completion], skip_special_tokens=True),
                        latency_s=per_item,
                        usage={"prompt_tokens": lengths[index], "completion_tokens": completion},
                    ),
                )
