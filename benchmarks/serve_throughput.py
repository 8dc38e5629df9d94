"""Serving throughput: concurrent clients against one-at-a-time, through ``persona-align serve``.

Both runs use the same server (``persona-align serve embedded --batch-size 8``, the PersoBench
policy, in a subprocess) on the embedded SmolLM2-135M-Instruct in fp32, the same FoCus
dialogues of ``../shared/data/persodpo-focus/prompts/valid.csv`` sent as chat requests (the
persona as the system message, the turns as messages; the server builds the PersoBench
prompt), greedy, 110 new tokens, through the official ``openai`` client over HTTP on
127.0.0.1. "One at a time" is one client sending the next request when it has the previous
reply; "concurrent" is ``--clients`` such clients sharing the list. Each run starts its own
server process (a fresh engine: its own slots, shared-prefix cache and reply index for
guesses), so neither profits from the other's replies. Then the roofline: what a prefill and
a decode step cost on this machine at 1 and at 8 rows, the numbers that bound the ratio.

    .venv/bin/python benchmarks/serve_throughput.py [--n 32] [--clients 8] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import torch

from persona_align.data import read_dialogues
from persona_align.generation.slots import SlotBatch
from persona_align.inference.engine import Conversation
from persona_align.models import load_causal_lm
from persona_align.prompting import persobench_messages, render_chat, shared_prefix
from persona_align.records import Dialogue

VALID = Path(__file__).resolve().parents[2] / "shared/data/persodpo-focus/prompts/valid.csv"
MODEL_ID = "embedded"
BATCH_SIZE = 8


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def chat_messages(dialogue: Dialogue) -> list[dict[str, str]]:
    conversation = Conversation(persona=dialogue.persona, context=dialogue.context)
    return [m.model_dump() for m in conversation.messages()]


@contextmanager
def server(max_tokens: int) -> Iterator[str]:
    """``persona-align serve embedded`` in a subprocess (a fresh engine: its own slots,
    shared-prefix cache and reply index); yields its base URL."""
    command = [sys.executable, "-m", "persona_align.cli", "serve", MODEL_ID, "--port", "0"]
    command += ["--json", "--batch-size", str(BATCH_SIZE), "--queue-size", "64"]
    command += ["--max-tokens", str(max_tokens)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stdout is not None
        yield json.loads(process.stdout.readline())["url"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)


def serve(
    bodies: list[list[dict[str, str]]], clients: int, max_tokens: int
) -> tuple[list[str], float, dict[str, int]]:
    """(raw replies in request order, wall seconds, the engine's counts) of ``clients``
    clients sharing the requests."""
    raws: list[str] = [""] * len(bodies)
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(bodies)):
        todo.put(index)
    with server(max_tokens) as url:

        def client() -> None:
            api = openai.OpenAI(base_url=url, api_key="unused", timeout=600)
            while True:
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                reply = api.chat.completions.create(
                    model=MODEL_ID, messages=bodies[index], max_tokens=max_tokens, temperature=0
                )
                assert reply.model_extra is not None
                raws[index] = reply.model_extra["persona_align"]["raw"]

        threads = [threading.Thread(target=client) for _ in range(clients)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - began
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health") as health:
            stats = json.load(health)["engine"]
    return raws, seconds, stats


def _fastest_ms(run: Any, repeats: int = 7) -> float:
    """The fastest of ``repeats`` timed calls after two untimed ones (new shapes set up their
    kernels on first use): on a shared machine the fastest is the closest to the cost alone."""
    run()
    run()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return 1000 * min(times)


def roofline(model: Any, prompts: list[list[int]]) -> list[tuple[str, float]]:
    """Milliseconds of a prefill (after the shared prefix) and of decode steps at 1 and 8 rows,
    1 and 5 tokens per row, with the prompts' keys/values in the rows."""
    batch = SlotBatch(model, BATCH_SIZE, eos_ids=set())
    out = []
    with torch.inference_mode(), batch:
        batch.set_prefix(prompts[0][: shared_prefix(prompts)])
        prompt = prompts[0]
        prefill = _fastest_ms(lambda: batch.drop(batch.add(None, prompt, 10_000)))
        after = len(prompt) - len(batch.prefix)
        out.append((f"prefill of one prompt ({after} tokens after the shared prefix)", prefill))
        for index, prompt in enumerate(prompts[:BATCH_SIZE]):
            batch.add(index, prompt, 10_000)
        decoder = batch.decoder
        for rows in (1, BATCH_SIZE):
            for fed in (1, 5):

                def step(rows: int = rows, fed: int = fed) -> None:
                    decoder.step([[1] * fed] * rows)
                    decoder.advance([0] * rows)  # nothing kept: the rows stay as they are

                out.append((f"decode step, {rows} row(s) x {fed} token(s)", _fastest_ms(step)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=110)
    parser.add_argument("--rounds", type=int, default=1, help="one-at-a-time/concurrent pairs")
    args = parser.parse_args()
    if not VALID.exists():
        sys.exit(f"{VALID} is absent")
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads")
    dialogues = read_dialogues("persobench-csv", VALID)[: max(args.n, BATCH_SIZE)]
    bodies = [chat_messages(d) for d in dialogues[: args.n]]

    rows = []
    for _ in range(args.rounds):
        for label, clients in (("one at a time", 1), (f"{args.clients} concurrent", args.clients)):
            raws, seconds, stats = serve(bodies, clients, args.max_new_tokens)
            rows.append((label, raws, seconds, stats))
    baseline = {label: raws for label, raws, _, _ in rows if label == "one at a time"}
    reference = baseline["one at a time"]
    alone_rate = statistics.mean(
        len(bodies) / seconds for label, _, seconds, _ in rows if label == "one at a time"
    )
    print(
        f"{len(bodies)} FoCus prompts, PersoBench prompt built by the server, greedy, "
        f"{args.max_new_tokens} new tokens, server batch size {BATCH_SIZE}"
    )
    print("| run | seconds | replies/s | x one at a time | decode steps | identical replies |")
    print("|---|---|---|---|---|---|")
    for label, raws, seconds, stats in rows:
        same = sum(a == b for a, b in zip(raws, reference, strict=True))
        print(
            f"| {label} | {seconds:.1f} | {len(bodies) / seconds:.3f} | "
            f"{len(bodies) / seconds / alone_rate:.2f} | {stats['steps']} | "
            f"{same}/{len(bodies)} |"
        )

    model, tokenizer = load_causal_lm(MODEL_ID)
    prompts = [
        tokenizer(
            render_chat(tokenizer, persobench_messages(d)), add_special_tokens=False
        ).input_ids
        for d in dialogues[:BATCH_SIZE]
    ]
    print("\n| roofline | ms |\n|---|---|")
    for what, ms in roofline(model, prompts):
        print(f"| {what} | {ms:.1f} |")


if __name__ == "__main__":
    main()
