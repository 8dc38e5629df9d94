"""Throughput of the ``openai`` responder against the fake server on loopback.

The fake server answers after a fixed simulated latency, so the number measures the
responder's own overhead (SDK, event loop, bookkeeping): what limits a run against a fast
local vLLM. Run: ``python benchmarks/openai_throughput.py``.
"""

from __future__ import annotations

import time

from persona_align.generation.base import GenerationParams, Request, Result
from persona_align.generation.openai_responder import OpenAIResponder
from persona_align.prompting import messages_hash, persobench_messages
from persona_align.records import Dialogue
from persona_align.testing.fake_server import FakeOpenAIServer, expected_content


def _requests(n: int) -> list[Request]:
    requests = []
    for i in range(n):
        dialogue = Dialogue(
            id=f"bench-{i}",
            persona=["I keep bees.", "I am afraid of the sea."],
            context=[{"speaker": "User1", "text": f"Hi! What do you do on weekends? ({i})"}],
        )
        messages = persobench_messages(dialogue)
        requests.append(Request(dialogue, messages, messages_hash(messages)))
    return requests


def run(n: int = 1000, concurrency: int = 32, latency_s: float = 0.005) -> dict[str, float]:
    """Answer ``n`` requests; the time covers ``generate`` only, not start-up or ``prepare``."""
    requests = _requests(n)
    results: list[tuple[Request, Result]] = []
    with FakeOpenAIServer(latency_s=latency_s) as server:
        responder = OpenAIResponder(
            model="fake-model", base_url=server.base_url, concurrency=concurrency
        )
        responder.prepare()
        start = time.perf_counter()
        responder.generate(requests, GenerationParams(), lambda r, res: results.append((r, res)))
        seconds = time.perf_counter() - start
    ok = sum(res.raw == expected_content(r.messages[-1].content) for r, res in results)
    if ok != n:
        raise RuntimeError(f"only {ok} of {n} replies came back right")
    return {"requests": n, "seconds": seconds, "req_per_s": n / seconds}


def main() -> None:
    print(f"{'concurrency':>11} {'requests':>8} {'seconds':>8} {'req/s':>8}")
    for concurrency in (1, 8, 32):
        stats = run(concurrency=concurrency)
        print(
            f"{concurrency:>11} {stats['requests']:>8} {stats['seconds']:>8.2f} "
            f"{stats['req_per_s']:>8.0f}"
        )


if __name__ == "__main__":
    main()
