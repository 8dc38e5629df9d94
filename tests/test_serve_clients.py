"""The server as its clients see it: the official ``openai`` client (streaming included),
concurrent clients decoded together, clients that hang up, the prompt-token bound.

Tiny random Llamas write junk; ``lively_llama_dir``'s replies vary token by token (real
streaming pieces), ``tiny_llama_dir``'s never end before their budget (a reply long enough to
hang up in the middle of). A forward hook slows the model where a test needs requests to
overlap or a reply to last.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from persona_align.inference.engine import Engine, load_engine, make_policy
from persona_align.inference.server import ChatServer, ServerLimits

MODEL_ID = "tiny"
LIMITS = ServerLimits(max_tokens_cap=400, default_max_tokens=12, batch_size=4)
PERSONA = "I keep bees.\nI am afraid of the sea."
QUESTIONS = [
    "Hi!",
    "What do you do on weekends?",
    "Do you ever go sailing, or is the sea too much for you?",
    "Tell me about your bees, your garden, your town and the honey you make every year.",
    "Why?",
    "What is the best thing about keeping bees, would you say, after all these years?",
]


@pytest.fixture(scope="module")
def lively(lively_llama_dir: Path) -> Iterator[Engine]:
    engine = load_engine(str(lively_llama_dir), batch_size=LIMITS.batch_size)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def raw_server(lively: Engine) -> Iterator[ChatServer]:
    with ChatServer(make_policy("raw", lively), MODEL_ID, port=0, limits=LIMITS) as server:
        yield server


def client_of(server: ChatServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": PERSONA}, {"role": "user", "content": question}]


@contextmanager
def slowed(engine: Engine, seconds: float) -> Iterator[None]:
    """Every forward of the engine's model takes at least ``seconds``."""
    handle = engine.model.register_forward_pre_hook(lambda *_: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_openai_client_completes_and_lists_models(raw_server: ChatServer) -> None:
    client = client_of(raw_server)
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=messages(QUESTIONS[1]), max_tokens=10
    )
    assert reply.object == "chat.completion" and reply.model == MODEL_ID
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 10
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages("Hi"))


def test_openai_client_streams_the_same_reply(raw_server: ChatServer) -> None:
    client = client_of(raw_server)
    whole = client.chat.completions.create(
        model=MODEL_ID, messages=messages(QUESTIONS[3]), max_tokens=24
    )
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=messages(QUESTIONS[3]),
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) > 1  # sent as it was generated, not in one piece at the end
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # without stream_options there is no usage chunk; the stream ends with the finish reason
    plain = list(
        client.chat.completions.create(
            model=MODEL_ID, messages=messages(QUESTIONS[3]), max_tokens=24, stream=True
        )
    )
    assert plain[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in plain)


def test_a_persobench_stream_sends_the_extracted_reply(lively: Engine) -> None:
    with ChatServer(make_policy("persobench", lively), MODEL_ID, port=0, limits=LIMITS) as server:
        client = client_of(server)
        whole = client.chat.completions.create(
            model=MODEL_ID, messages=messages(QUESTIONS[2]), max_tokens=16
        )
        chunks = list(
            client.chat.completions.create(
                model=MODEL_ID, messages=messages(QUESTIONS[2]), max_tokens=16, stream=True
            )
        )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].model_extra is not None
    assert (
        chunks[-1].model_extra["persona_align"]["raw"] == whole.model_extra["persona_align"]["raw"]
    )


def test_a_bad_streaming_request_fails_before_the_stream(raw_server: ChatServer) -> None:
    client = client_of(raw_server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL_ID, messages=messages("Hi"), max_tokens=0, stream=True
        )
    assert caught.value.status_code == 400 and caught.value.param == "max_tokens"
    too_long = [{"role": "user", "content": "bees " * 3000}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_ID, messages=too_long, stream=True)
    assert caught.value.code == "context_length_exceeded"


def test_prompts_over_the_token_bound_are_refused(lively: Engine) -> None:
    limits = ServerLimits(max_prompt_tokens=40, default_max_tokens=4)
    with ChatServer(make_policy("raw", lively), MODEL_ID, port=0, limits=limits) as server:
        client = client_of(server)
        assert client.chat.completions.create(model=MODEL_ID, messages=messages("Hi"))
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(
                    model=MODEL_ID, messages=messages(QUESTIONS[3]), stream=stream
                )
            error = caught.value
            assert (error.code, error.param) == ("prompt_too_long", "messages")
            assert "at most 40" in error.message
        assert server.stats()["by_status"] == {200: 1, 400: 2}


def test_concurrent_greedy_requests_decode_together_and_equal_one_at_a_time(
    raw_server: ChatServer, lively: Engine
) -> None:
    """Six clients at once on four slots: the replies of one-at-a-time serving, in fewer
    decode steps (a finished reply's slot takes the next request while others go on)."""
    client = client_of(raw_server)
    budgets = [8, 30, 14, 22, 5, 26]

    def ask(index: int) -> str:
        reply = client.chat.completions.create(
            model=MODEL_ID, messages=messages(QUESTIONS[index]), max_tokens=budgets[index]
        )
        return reply.choices[0].message.content or ""

    before = lively.stats()["steps"]
    alone = [ask(i) for i in range(len(QUESTIONS))]
    steps_alone = lively.stats()["steps"] - before
    assert lively.stats()["most_rows"] == 1

    together: dict[int, str] = {}
    threads = [
        threading.Thread(target=lambda i=i: together.__setitem__(i, ask(i)))
        for i in range(len(QUESTIONS))
    ]
    before = lively.stats()["steps"]
    with slowed(lively, 0.05):  # the six requests arrive while the first ones decode
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert [together[i] for i in range(len(QUESTIONS))] == alone
    assert lively.stats()["most_rows"] == LIMITS.batch_size
    assert lively.stats()["steps"] - before < 0.75 * steps_alone


@pytest.fixture
def long_replies(tiny_llama_dir: Path) -> Iterator[tuple[ChatServer, Engine]]:
    """One slot, replies of up to 400 tokens at >= 40 ms a step: a hung-up client's reply
    would hold the slot for seconds."""
    engine = load_engine(str(tiny_llama_dir), batch_size=1)
    limits = ServerLimits(max_tokens_cap=400, default_max_tokens=400, batch_size=1)
    with (
        slowed(engine, 0.04),
        ChatServer(make_policy("raw", engine), MODEL_ID, port=0, limits=limits) as server,
    ):
        yield server, engine
    engine.close()


def test_a_client_that_hangs_up_mid_stream_frees_its_slot(
    long_replies: tuple[ChatServer, Engine],
) -> None:
    server, engine = long_replies
    client = client_of(server)
    stream = client.chat.completions.create(model=MODEL_ID, messages=messages("Hi"), stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break  # the reply is under way
    stream.close()
    assert wait_for(lambda: engine.stats()["cancelled"] == 1)
    assert engine.stats()["rows"] == 0 and engine.stats()["replies"] == 0
    assert wait_for(lambda: server.pending == 0)
    # the slot is free: the next request is answered (one token, at once)
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages("Hi"), max_tokens=1)
    assert reply.usage is not None and reply.usage.completion_tokens == 1
    assert engine.stats()["replies"] == 1


def test_a_client_that_hangs_up_before_its_reply_stops_its_work(
    long_replies: tuple[ChatServer, Engine],
) -> None:
    server, engine = long_replies
    body = json.dumps({"model": MODEL_ID, "messages": messages("Hi")}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert wait_for(lambda: engine.stats().get("rows") == 1)  # decoding
    assert wait_for(lambda: engine.stats()["cancelled"] == 1)
    assert engine.stats()["replies"] == 0
    assert wait_for(lambda: server.stats()["by_status"].get(499) == 1)
    assert server.pending == 0


def test_health(raw_server: ChatServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", raw_server.port, timeout=10)
    conn.request("GET", "/health")
    response = conn.getresponse()
    payload: dict[str, Any] = json.loads(response.read())
    conn.close()
    assert response.status == 200
    assert payload["status"] == "ok" and payload["model"] == MODEL_ID
    assert payload["pending"] == 0 and payload["engine"]["rows"] == 0


def test_a_model_error_fails_its_reply_and_the_server_goes_on(
    raw_server: ChatServer, lively: Engine
) -> None:
    failed: list[int] = []

    def fail_once(*_: Any) -> None:
        if not failed:
            failed.append(1)
            raise RuntimeError("out of memory, say")

    client = client_of(raw_server)
    client.chat.completions.create(model=MODEL_ID, messages=messages("Hi"), max_tokens=1)
    handle = lively.model.register_forward_pre_hook(fail_once)  # fails the next prefill
    try:
        with pytest.raises(openai.InternalServerError, match="generation failed"):
            client.chat.completions.create(model=MODEL_ID, messages=messages("Hi"))
    finally:
        handle.remove()
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages("Hi"), max_tokens=3)
    assert reply.usage is not None and reply.usage.completion_tokens == 3
