"""The OpenAI-compatible server over a tiny random Llama, over real HTTP on 127.0.0.1.

Random weights write junk, so the tests check the protocol, the error replies, and that the
served greedy reply is exactly what the ``hf`` responder generates for the same prompt.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from persona_align.errors import InputError
from persona_align.generation import GenerationParams, make_responder, run_responder
from persona_align.generation.base import Request, Result
from persona_align.inference.engine import (
    Conversation,
    Engine,
    Reply,
    ReplyParams,
    ReplyPolicy,
    Watch,
    load_engine,
    make_policy,
    served_name,
)
from persona_align.inference.server import ChatServer, ServerLimits
from persona_align.prompting import extract_response, messages_hash
from persona_align.records import Dialogue, Message

MODEL_ID = "tiny"
LIMITS = ServerLimits(max_body_bytes=64 * 1024, max_tokens_cap=16, default_max_tokens=8)
PERSONA = ["I keep bees.", "I am afraid of the sea."]
CONTEXT = [
    ("user", "Hi! What do you do on weekends?"),
    ("assistant", "Mostly I look after my hives."),
    ("user", "Do you ever go sailing?"),
]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path):
    engine = load_engine(str(tiny_llama_dir))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def persobench_server(engine: Engine):
    with ChatServer(make_policy("persobench", engine), MODEL_ID, port=0, limits=LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def raw_server(engine: Engine):
    with ChatServer(make_policy("raw", engine), MODEL_ID, port=0, limits=LIMITS) as server:
        yield server


def call(
    server: ChatServer | int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, decoded JSON body, lower-cased headers) of one request on a fresh connection."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    port = server if isinstance(server, int) else server.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        payload = json.loads(response.read())
        return response.status, payload, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def chat_body(**overrides: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "\n".join(PERSONA)}]
    messages += [{"role": role, "content": text} for role, text in CONTEXT]
    return {"model": MODEL_ID, "messages": messages, **overrides}


def dialogue() -> Dialogue:
    speakers = {"user": "User1", "assistant": "User2"}
    context = [{"speaker": speakers[role], "text": text} for role, text in CONTEXT]
    return Dialogue(id="d0", persona=PERSONA, context=context)


def hf_generate(model_dir: Path, messages: list[Message], max_new_tokens: int) -> Result:
    """What the ``hf`` responder generates for these messages (greedy)."""
    responder = make_responder("hf", model=str(model_dir))
    request = Request(dialogue(), messages, messages_hash(messages))
    results: list[Result] = []
    responder.generate([request], GenerationParams(max_new_tokens=max_new_tokens), _append(results))
    return results[0]


def _append(results: list[Result]):
    return lambda _request, result: results.append(result)


def assert_error(payload: dict[str, Any], param: str | None = None) -> str:
    """An OpenAI-shaped error body; returns its message."""
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error["message"]


def test_models_lists_the_served_model(persobench_server: ChatServer) -> None:
    status, payload, _ = call(persobench_server, "GET", "/v1/models")
    assert status == 200
    assert payload["object"] == "list"
    assert [m["id"] for m in payload["data"]] == [MODEL_ID]
    status, payload, _ = call(persobench_server, "GET", f"/v1/models/{MODEL_ID}")
    assert (status, payload["id"], payload["object"]) == (200, MODEL_ID, "model")
    status, payload, _ = call(persobench_server, "GET", "/v1/models/gpt-4")
    assert status == 404 and payload["error"]["code"] == "model_not_found"


def test_persobench_completion_is_the_hf_responders_reply(
    persobench_server: ChatServer, tiny_llama_dir: Path
) -> None:
    status, payload, _ = call(persobench_server, "POST", "/v1/chat/completions", chat_body())
    assert status == 200, payload
    assert payload["object"] == "chat.completion" and payload["model"] == MODEL_ID
    assert payload["id"].startswith("chatcmpl-")
    (choice,) = payload["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in {"stop", "length"}
    usage = payload["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= LIMITS.default_max_tokens
    extra = payload["persona_align"]
    assert extra["policy"] == "persobench"
    # the served reply is what `generate` makes of the same dialogue's PersoBench prompt
    candidate = run_responder(
        [dialogue()],
        make_responder("hf", model=str(tiny_llama_dir)),
        GenerationParams(max_new_tokens=LIMITS.default_max_tokens),
    )[0]
    assert extra["raw"] == candidate.raw
    response = extract_response(candidate.raw)
    assert extra["extracted"] is (response is not None)
    assert choice["message"]["content"] == (candidate.raw if response is None else response)
    # greedy: asking again gives the same reply
    again = call(persobench_server, "POST", "/v1/chat/completions", chat_body())[1]
    assert again["choices"][0]["message"] == choice["message"]


def test_raw_prompt_passes_the_messages_through(
    raw_server: ChatServer, tiny_llama_dir: Path
) -> None:
    body = chat_body(max_tokens=6)
    status, payload, _ = call(raw_server, "POST", "/v1/chat/completions", body)
    assert status == 200, payload
    messages = [Message(**m) for m in body["messages"]]
    expected = hf_generate(tiny_llama_dir, messages, 6)
    assert payload["choices"][0]["message"]["content"] == expected.raw
    assert payload["persona_align"] | {"latency_s": 0} == {
        "policy": "raw", "extracted": None, "raw": expected.raw, "latency_s": 0,
    }  # fmt: skip
    assert payload["usage"]["prompt_tokens"] == expected.usage["prompt_tokens"]
    assert payload["usage"]["completion_tokens"] == expected.usage["completion_tokens"]
    # text parts are joined, as OpenAI's clients may send them
    parts = chat_body(max_tokens=6)
    parts["messages"][-1]["content"] = [{"type": "text", "text": CONTEXT[-1][1]}]
    assert (
        call(raw_server, "POST", "/v1/chat/completions", parts)[1]["choices"]
        == (payload["choices"])
    )


def test_sampling_parameters_are_honoured(raw_server: ChatServer) -> None:
    def content(**overrides: Any) -> tuple[str, dict[str, Any]]:
        status, payload, _ = call(
            raw_server, "POST", "/v1/chat/completions", chat_body(**overrides)
        )
        assert status == 200, payload
        return payload["choices"][0]["message"]["content"], payload

    greedy, _ = content(max_tokens=12)
    sampled = {seed: content(max_tokens=12, temperature=1.5, seed=seed)[0] for seed in (1, 2, 3)}
    assert content(max_tokens=12, temperature=1.5, seed=1)[0] == sampled[1]  # seeded: repeatable
    assert len(set(sampled.values()) | {greedy}) > 1  # 12 random tokens from 49k: never all equal
    _, short = content(max_tokens=2)
    assert short["usage"]["completion_tokens"] <= 2
    if short["usage"]["completion_tokens"] == 2:
        assert short["choices"][0]["finish_reason"] == "length"


def test_openai_responder_works_against_the_server(
    raw_server: ChatServer, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PERSONA_ALIGN_NO_KEY", raising=False)  # loopback: a placeholder key
    dialogues = [
        dialogue(),
        Dialogue(id="d1", persona=["I paint."], context=[{"speaker": "User1", "text": "Hello?"}]),
    ]
    params = GenerationParams(max_new_tokens=6)
    responder = make_responder(
        "openai", model=MODEL_ID, base_url=raw_server.base_url, api_key_env="PERSONA_ALIGN_NO_KEY"
    )
    served = run_responder(dialogues, responder, params)
    local = run_responder(dialogues, make_responder("hf", model=str(tiny_llama_dir)), params)
    assert [c.error for c in served] == [None, None]
    assert [c.raw for c in served] == [c.raw for c in local]
    assert [c.prompt_hash for c in served] == [c.prompt_hash for c in local]


def test_persobench_server_needs_a_persona(persobench_server: ChatServer) -> None:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hello?"}]}
    status, payload, _ = call(persobench_server, "POST", "/v1/chat/completions", body)
    assert status == 400
    assert "persona" in assert_error(payload, "messages")
    ends_with_assistant = chat_body()
    ends_with_assistant["messages"].append({"role": "assistant", "content": "Never."})
    status, payload, _ = call(
        persobench_server, "POST", "/v1/chat/completions", ends_with_assistant
    )
    assert status == 400 and "last message" in assert_error(payload)


def test_bad_requests_get_clear_errors_and_the_server_stays_up(
    persobench_server: ChatServer,
) -> None:
    post = "/v1/chat/completions"
    bad_roles = chat_body()
    bad_roles["messages"][1]["role"] = "tool"
    late_system = chat_body()
    late_system["messages"].append({"role": "system", "content": "I am a pirate."})
    empty_turn = chat_body()
    empty_turn["messages"][1]["content"] = "  "
    image = chat_body()
    image["messages"][1]["content"] = [{"type": "image_url", "image_url": {"url": "x"}}]
    cases: list[tuple[str, str, Any, int, str | None]] = [
        ("POST", post, b'{"model": "tiny", "messages": [', 400, None),
        ("POST", post, b"\xff\xfe not utf-8", 400, None),
        ("POST", post, b"[1, 2]", 400, None),
        ("POST", post, {"model": MODEL_ID}, 400, "messages"),
        ("POST", post, chat_body(messages=[]), 400, "messages"),
        ("POST", post, {"messages": chat_body()["messages"]}, 400, "model"),
        ("POST", post, bad_roles, 400, "messages[1].role"),
        ("POST", post, late_system, 400, "messages[4].role"),
        ("POST", post, empty_turn, 400, "messages[1].content"),
        ("POST", post, image, 400, "messages[1].content"),
        ("POST", post, chat_body(model="gpt-4o"), 404, "model"),
        ("POST", post, chat_body(max_tokens=LIMITS.max_tokens_cap + 1), 400, "max_tokens"),
        ("POST", post, chat_body(max_completion_tokens=10_000), 400, "max_completion_tokens"),
        ("POST", post, chat_body(max_tokens=0), 400, "max_tokens"),
        ("POST", post, chat_body(max_tokens=True), 400, "max_tokens"),
        ("POST", post, chat_body(temperature="hot"), 400, "temperature"),
        ("POST", post, chat_body(top_p=0), 400, "top_p"),
        ("POST", post, chat_body(logit_bias={"1": 5}), 400, "logit_bias"),
        ("POST", post, chat_body(n=2), 400, "n"),
        ("POST", post, chat_body(stream="yes"), 400, "stream"),
        ("POST", post, chat_body(stream_options={"include_usage": True}), 400, "stream_options"),
        # a streaming request with a bad field is refused before any stream starts
        ("POST", post, chat_body(stream=True, max_tokens=0), 400, "max_tokens"),
        ("POST", post, chat_body(stream=True, logit_bias={"1": 5}), 400, "logit_bias"),
        ("POST", post, chat_body(stream=True, model="gpt-4o"), 404, "model"),
        ("POST", post, b"x" * (LIMITS.max_body_bytes + 1), 413, None),
        ("GET", post, None, 405, None),
        ("POST", "/v1/models", b"{}", 405, None),
        ("POST", "/v1/completions", chat_body(), 404, None),
        ("GET", "/", None, 404, None),
    ]
    for method, path, body, expected, param in cases:
        status, payload, headers = call(persobench_server, method, path, body)
        assert status == expected, (method, path, body, payload)
        assert_error(payload, param)
        if status == 405:
            assert headers["allow"] in {"GET", "POST"}
    # a too-long prompt is refused before generating
    long_body = chat_body()
    long_body["messages"][-1]["content"] = "bees " * 3000
    status, payload, _ = call(persobench_server, "POST", post, long_body)
    assert (status, payload["error"]["code"]) == (400, "context_length_exceeded")
    # not even HTTP, and a client that hangs up half-way: the server shrugs both off
    with socket.create_connection(("127.0.0.1", persobench_server.port), timeout=10) as sock:
        sock.sendall(b"hello there\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(("127.0.0.1", persobench_server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 500\r\n\r\n{")
    # the same keep-alive connection serves a good request after a bad one
    conn = http.client.HTTPConnection("127.0.0.1", persobench_server.port, timeout=30)
    conn.request("POST", post, body=b"{oops")
    first = conn.getresponse()
    assert first.status == 400
    first.read()
    conn.request("POST", post, body=json.dumps(chat_body()).encode())
    second = conn.getresponse()
    assert second.status == 200
    assert json.loads(second.read())["choices"][0]["message"]["role"] == "assistant"
    conn.close()
    assert persobench_server.stats()["by_status"][413] >= 1


class GatedPolicy(ReplyPolicy):
    """Replies only when the test opens the gate; records how many replies ran at once."""

    name = "gated"

    def __init__(self) -> None:
        super().__init__(engine=None)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def reply(
        self, conversation: Conversation, params: ReplyParams, watch: Watch | None = None
    ) -> Reply:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        self.started.release()
        self.gate.wait(30)
        with self._lock:
            self.running -= 1
        text = conversation.context[-1].text.upper()
        return Reply(text, text, None, 1, 1, "stop", self.name)


def test_generation_is_serialised_behind_a_bounded_queue() -> None:
    policy = GatedPolicy()
    limits = ServerLimits(batch_size=1, queue_size=1)
    with ChatServer(policy, MODEL_ID, port=0, limits=limits) as server:
        replies: dict[str, tuple[int, dict[str, Any]]] = {}

        def ask(text: str) -> None:
            body = {"model": MODEL_ID, "messages": [{"role": "user", "content": text}]}
            status, payload, _ = call(server, "POST", "/v1/chat/completions", body)
            replies[text] = (status, payload)

        threads = [threading.Thread(target=ask, args=(text,)) for text in ("one", "two")]
        threads[0].start()
        assert policy.started.acquire(timeout=10)  # "one" is generating
        threads[1].start()
        deadline = time.monotonic() + 10
        while server.pending < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.pending == 2  # "two" waits in the queue
        ask("three")
        status, payload = replies["three"]
        assert status == 503 and payload["error"]["code"] == "queue_full"
        policy.gate.set()
        for thread in threads:
            thread.join(30)
        assert {t: (s, p["choices"][0]["message"]["content"]) for t, (s, p) in replies.items() if s == 200} == {
            "one": (200, "ONE"), "two": (200, "TWO"),
        }  # fmt: skip
        assert policy.most_running == 1


def test_a_peft_adapter_is_merged_into_its_base(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.tensor([[1, 50, 300, 7000, 12]])
    with torch.no_grad():
        base_logits = base(ids).logits
    peft_model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA starts as the identity; make it change something
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.peft_config["default"].base_model_name_or_path = str(tiny_llama_dir)
    adapter = tmp_path / "my-adapter"
    peft_model.save_pretrained(adapter)
    peft_model.eval()
    with torch.no_grad():
        adapter_logits = peft_model(ids).logits
    engine = load_engine(str(adapter))
    with torch.no_grad():
        merged_logits = engine.model(ids).logits
    assert not hasattr(engine.model, "peft_config")  # merged, a plain model again
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-5)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)
    assert engine.tokenizer.chat_template  # the base's tokenizer: none was saved beside it
    assert served_name(str(adapter)) == "my-adapter"


def test_bad_adapters_and_models_are_one_line_errors(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        '{"task_type": "SEQ_CLS", "base_model_name_or_path": "x"}'
    )
    with pytest.raises(InputError, match="not a causal LM"):
        load_engine(str(adapter))
    (adapter / "adapter_config.json").write_text('{"task_type": "CAUSAL_LM"}')
    with pytest.raises(InputError, match="base_model_name_or_path"):
        load_engine(str(adapter))
    (adapter / "adapter_config.json").write_text("{")
    with pytest.raises(InputError, match="adapter_config\\.json"):
        load_engine(str(adapter))
    with pytest.raises(InputError, match="dtype"):
        load_engine(str(adapter), dtype="int4")


def test_cli_serve_rejects_bad_options(cli, tmp_path: Path) -> None:
    for args, words in [
        (["--prompt", "fancy"], "--prompt"),
        (["--max-tokens", "600"], "max_tokens_cap"),
        (["--port", "70000"], "--port"),
        (["--queue-size", "-1"], "queue_size"),
        (["--max-prompt-tokens", "0"], "max_prompt_tokens"),
        (["--batch-size", "0"], "batch_size"),
    ]:
        result = cli("serve", tmp_path, *args)
        assert result.code == 2, result.err
        assert words in result.err and len(result.err.strip().splitlines()) == 1
    result = cli("serve", tmp_path / "missing" / "model")
    assert result.code == 2 and "missing" in result.err
    result = cli("serve", tmp_path)  # a folder with no model in it
    assert result.code == 2 and "not a model folder" in result.err


def test_cli_serve_end_to_end(tiny_llama_dir: Path) -> None:
    """`persona-align serve --port 0 --json` in a subprocess: URL first, summary after SIGTERM."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "persona_align.cli", "serve", str(tiny_llama_dir)]
    command += [
        "--port",
        "0",
        "--json",
        "--prompt",
        "raw",
        "--model-name",
        "t",
        "--max-tokens",
        "4",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())
        assert first["event"] == "listening" and first["model"] == "t"
        url = urlsplit(first["url"])
        assert url.hostname == "127.0.0.1" and url.path == "/v1"
        server = url.port
        assert server is not None
        assert call(server, "GET", "/v1/models")[1]["data"][0]["id"] == "t"
        body = {"model": "t", "messages": [{"role": "user", "content": "Hi"}]}
        status, payload, _ = call(server, "POST", "/v1/chat/completions", body)
        assert status == 200 and payload["usage"]["completion_tokens"] <= 4
        assert call(server, "GET", "/nope")[0] == 404
        process.send_signal(signal.SIGTERM)  # SIGINT may be ignored in background jobs
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["command"] == "serve"
    assert summary["requests"] == 3 and summary["by_status"] == {"200": 2, "404": 1}
    assert "POST /v1/chat/completions 200" in err  # the access log


def test_select_then_generate_policy_behind_the_server(engine: Engine) -> None:
    from persona_align.inference import select_generate

    policy = make_policy("select-then-generate", engine)
    with ChatServer(policy, MODEL_ID, port=0, limits=LIMITS) as server:
        status, payload, _ = call(server, "POST", "/v1/chat/completions", chat_body(max_tokens=8))
        assert status == 200, payload
        assert payload["persona_align"]["policy"] == "select-then-generate"
        _, raw, _ = select_generate.select_then_generate_one(
            engine.model, engine.tokenizer, PERSONA, dialogue().context,
            GenerationParams(max_new_tokens=8),
        )  # fmt: skip
        assert payload["persona_align"]["raw"] == raw
        status, payload, _ = call(server, "POST", "/v1/chat/completions",
                                  chat_body(messages=[{"role": "user", "content": "hi"}]))  # fmt: skip
        assert status == 400 and "persona" in assert_error(payload)


def test_greedy_replies_go_through_a_slot_and_equal_generate(lively_llama_dir: Path) -> None:
    import torch

    from persona_align.prompting import render_chat

    engine = load_engine(str(lively_llama_dir))
    messages = [Message(role="user", content="Tell me about your bees and the sea, please.")]
    got = engine.generate(messages, ReplyParams(max_tokens=24))
    steps = engine.stats()["steps"]
    assert steps > 0  # decoded in a slot

    tokenizer = engine.tokenizer
    enc = tokenizer(
        [render_chat(tokenizer, messages)], return_tensors="pt", add_special_tokens=False
    )
    with torch.inference_mode():
        out = engine.model.generate(
            **enc, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    tokens = out[0, enc["input_ids"].shape[1] :].tolist()
    assert got.completion_tokens == len(tokens)
    assert got.raw == tokenizer.decode(tokens, skip_special_tokens=True)

    engine.generate(messages, ReplyParams(max_tokens=8, temperature=0.8, seed=1))
    assert engine.stats()["steps"] == steps  # sampling stays with model.generate
    assert engine.stats()["replies"] == 2
    engine.close()
