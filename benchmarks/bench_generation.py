"""Generation speed: batched ``hf`` responder vs one transformers ``pipeline`` call per prompt.

The baseline is how the PersoBench notebooks generate: a text-generation pipeline called once
per prompt. Both sides use the embedded SmolLM2-135M-Instruct, the same chat-rendered
PersoBench prompts and greedy decoding with 110 new tokens; tokens are counted the same way
(re-tokenizing the generated text). The batched responder also runs without looked-up guesses
(``guesses=0``, slot decoding alone), and in bf16, reported separately with its agreement.

    .venv/bin/python benchmarks/bench_generation.py [--n 64] [--batch-size 8] [--skip-openai]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from persona_align.data import read_dialogues
from persona_align.generation import GenerationParams, make_responder, run_responder
from persona_align.models import load_causal_lm
from persona_align.prompting import persobench_messages, render_chat

VALID = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "persodpo-focus"
    / "prompts"
    / "valid.csv"
)


def count_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids)


def baseline(dialogues, max_new_tokens: int) -> tuple[list[str], float]:
    from transformers import pipeline

    model, tokenizer = load_causal_lm("embedded")
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    outputs, began = [], time.perf_counter()
    for dialogue in dialogues:
        text = render_chat(tokenizer, persobench_messages(dialogue))
        out = generator(
            text, max_new_tokens=max_new_tokens, do_sample=False, return_full_text=False
        )
        outputs.append(out[0]["generated_text"])
    return outputs, time.perf_counter() - began


def batched(
    dialogues, max_new_tokens: int, batch_size: int, dtype: str, guesses: int = 4
) -> tuple[list[str], float]:
    responder = make_responder(
        "hf", model="embedded", batch_size=batch_size, dtype=dtype, guesses=guesses
    )
    responder.prepare()  # model loading is not part of the timed work
    began = time.perf_counter()
    candidates = run_responder(
        dialogues, responder, GenerationParams(max_new_tokens=max_new_tokens)
    )
    return [c.raw for c in candidates], time.perf_counter() - began


def agreement(a: list[str], b: list[str]) -> float:
    return sum(x.strip() == y.strip() for x, y in zip(a, b, strict=True)) / len(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=110)
    parser.add_argument("--skip-openai", action="store_true")
    args = parser.parse_args()
    if not VALID.exists():
        sys.exit(f"{VALID} is absent")
    dialogues = read_dialogues("persobench-csv", VALID)[: args.n]
    _, tokenizer = load_causal_lm("embedded")

    base_out, base_s = baseline(dialogues, args.max_new_tokens)
    fp32_out, fp32_s = batched(dialogues, args.max_new_tokens, args.batch_size, "float32")
    plain_out, plain_s = batched(dialogues, args.max_new_tokens, args.batch_size, "float32", 0)
    bf16_out, bf16_s = batched(dialogues, args.max_new_tokens, args.batch_size, "bfloat16")

    rows = [
        ("pipeline, one prompt per call (baseline)", base_out, base_s),
        (f"hf responder, batch {args.batch_size}, fp32", fp32_out, fp32_s),
        (f"hf responder, batch {args.batch_size}, fp32, no guesses", plain_out, plain_s),
        (f"hf responder, batch {args.batch_size}, bf16", bf16_out, bf16_s),
    ]
    base_tps = count_tokens(tokenizer, base_out) / base_s
    print(
        f"{len(dialogues)} prompts from {VALID.name}, greedy, {args.max_new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads"
    )
    print("| run | seconds | generated tokens | tokens/s | x baseline | same output as baseline |")
    print("|---|---|---|---|---|---|")
    for label, outputs, seconds in rows:
        tokens = count_tokens(tokenizer, outputs)
        print(
            f"| {label} | {seconds:.1f} | {tokens} | {tokens / seconds:.1f} | "
            f"{tokens / seconds / base_tps:.2f} | {agreement(outputs, base_out):.1%} |"
        )
    print(f"bf16 vs fp32 batched outputs identical: {agreement(bf16_out, fp32_out):.1%}")

    if not args.skip_openai:
        sys.path.insert(0, str(Path(__file__).parent))
        from openai_throughput import run

        result = run(n=1000, concurrency=32, latency_s=0.005)
        print(f"openai responder vs fake server (5 ms latency, concurrency 32): {result}")


if __name__ == "__main__":
    main()
