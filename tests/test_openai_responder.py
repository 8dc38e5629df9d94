"""The openai responder against the fake server, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from persona_align.cli.run_config import sample_path
from persona_align.errors import InputError, redact_url
from persona_align.generation.base import GenerationParams, Request, Result, make_responder
from persona_align.generation.openai_responder import OpenAIResponder
from persona_align.prompting import messages_hash, persobench_messages
from persona_align.records import Dialogue
from persona_align.testing.fake_server import (
    FAULT_KINDS,
    FakeOpenAIServer,
    content_hash,
    expected_content,
)

KEY_ENV = "PERSONA_ALIGN_TEST_KEY"
SECRET = "sk-test-SECRET-1234"
MIXED_FAULTS = dict.fromkeys(FAULT_KINDS, 0.04)  # 20% of attempts, all five kinds
# what each injected fault becomes when it is not retried
ERROR_OF_FAULT = {
    "429": {"RateLimitError"},
    "500": {"InternalServerError"},
    "slow": {"APITimeoutError", "TimeoutError"},
    "malformed": {"MalformedResponseError"},
    "drop": {"APIConnectionError"},
}


def make_requests(n: int) -> list[Request]:
    requests = []
    for i in range(n):
        dialogue = Dialogue(
            id=f"d{i}",
            persona=["I keep bees.", "I fear the sea."],
            context=[{"speaker": "User1", "text": f"Any hobbies? ({i})"}],
        )
        messages = persobench_messages(dialogue)
        requests.append(
            Request(dialogue=dialogue, messages=messages, prompt_hash=messages_hash(messages))
        )
    return requests


def last_user(request: Request) -> str:
    return request.messages[-1].content


def generate(responder: OpenAIResponder, requests: list[Request]) -> list[tuple[Request, Result]]:
    results: list[tuple[Request, Result]] = []
    responder.generate(requests, GenerationParams(), lambda r, res: results.append((r, res)))
    return results


def responder_for(server: FakeOpenAIServer, **options: object) -> OpenAIResponder:
    """Fast-failing settings: a 0.5 s timeout against 2 s hangs, 10 ms backoff."""
    defaults: dict[str, object] = {
        "model": "fake-model",
        "base_url": server.base_url,
        "api_key_env": KEY_ENV,
        "concurrency": 32,
        "timeout": 0.5,
        "backoff_base": 0.01,
    }
    return OpenAIResponder(**{**defaults, **options})  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_registered_and_settings_hold_what_changes_outputs() -> None:
    responder = make_responder("openai", model="gpt-x", base_url="http://h:1/v1/", concurrency=3)
    assert isinstance(responder, OpenAIResponder)
    assert responder.name == "gpt-x"
    assert responder.settings() == {"kind": "openai", "model": "gpt-x", "base_url": "http://h:1/v1"}
    assert make_responder("openai", model="m").settings()["base_url"] == "https://api.openai.com/v1"
    with pytest.raises(InputError, match="concurrency"):
        make_responder("openai", model="m", concurrency=0)
    with pytest.raises(InputError, match="responder 'openai'"):
        make_responder("openai", model="m", colour="red")


def test_every_request_recovers_from_faults_with_retries() -> None:
    requests = make_requests(500)
    with FakeOpenAIServer(faults=MIXED_FAULTS, slow_s=2.0, expected_key=SECRET) as server:
        responder = responder_for(server, max_retries=10)
        responder.prepare()
        results = generate(responder, requests)
        calls, by_prompt = server.calls, server.calls_by_prompt
    assert Counter(r.dialogue.id for r, _ in results) == Counter(r.dialogue.id for r in requests)
    for request, result in results:
        assert result.error is None
        assert result.raw == expected_content(last_user(request))
        assert result.latency_s is not None and result.latency_s > 0
        assert result.usage["total_tokens"] == result.usage["prompt_tokens"] + 4
    # faults did happen, and every retry is one of them
    first_faults = sum(server.fault_for(last_user(r), 0) is not None for r in requests)
    assert 60 < first_faults < 140
    assert calls == sum(by_prompt.values()) >= 500 + first_faults
    assert set(by_prompt) == {content_hash(last_user(r)) for r in requests}


def test_without_retries_failures_come_back_as_results() -> None:
    requests = make_requests(500)
    # a longer timeout, so that only injected hangs time out on a busy machine
    with FakeOpenAIServer(faults=MIXED_FAULTS, slow_s=5.0) as server:
        responder = responder_for(server, max_retries=0, timeout=2.5)
        responder.prepare()
        results = generate(responder, requests)
        assert server.calls == 500
        faults = {r.dialogue.id: server.fault_for(last_user(r), 0) for r in requests}
    assert len(results) == 500
    assert {faults[r.dialogue.id] for r, _ in results} == {None, *FAULT_KINDS}
    for request, result in results:
        fault = faults[request.dialogue.id]
        if fault is None:
            assert (result.error, result.raw) == (None, expected_content(last_user(request)))
        else:
            assert result.error in ERROR_OF_FAULT[fault]
            assert (result.raw, result.latency_s) == ("", None)


@pytest.mark.parametrize(
    ("retry_after", "backoff_max", "low", "high"),
    [(1, 30.0, 0.95, 3.0), (0, 30.0, 0.0, 0.8), (1, 0.2, 0.0, 0.9)],
    ids=["honoured", "zero", "capped"],
)
def test_retry_after_on_429(
    retry_after: float, backoff_max: float, low: float, high: float
) -> None:
    server = FakeOpenAIServer(faults={"429": 1.0}, faulty_attempts=1, retry_after=retry_after)
    with server:
        # our own backoff would wait up to backoff_max: only Retry-After makes it exact
        responder = responder_for(server, backoff_base=100.0, backoff_max=backoff_max)
        responder.prepare()  # imports and first-call costs stay out of the timing
        start = time.perf_counter()
        [(_, result)] = generate(responder, make_requests(1))
        elapsed = time.perf_counter() - start
        assert server.calls == 2
    assert result.error is None
    assert low <= elapsed < high


def test_missing_key_variable_fails_at_prepare(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    responder = OpenAIResponder(
        model="m", base_url="https://api.example.com/v1", api_key_env=KEY_ENV
    )
    with pytest.raises(InputError, match=KEY_ENV) as err:
        responder.prepare()
    assert "\n" not in str(err.value)


def test_local_server_needs_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with FakeOpenAIServer(expected_key="EMPTY") as server:
        responder = responder_for(server)
        responder.prepare()
        [(_, result)] = generate(responder, make_requests(1))
    assert result.error is None


def test_unreachable_server_fails_at_prepare() -> None:
    url = closed_port_url()
    responder = OpenAIResponder(model="m", base_url=url, api_key_env=KEY_ENV, timeout=2.0)
    with pytest.raises(InputError, match=f"cannot reach OpenAI-compatible server at {url}: "):
        responder.prepare()


def test_wrong_base_url_fails_at_prepare() -> None:
    with FakeOpenAIServer() as server:
        responder = OpenAIResponder(model="m", base_url=server.base_url[: -len("/v1")])
        with pytest.raises(InputError, match="end in /v1"):
            responder.prepare()


def test_wrong_key_fails_at_prepare_and_is_never_retried() -> None:
    with FakeOpenAIServer(expected_key="sk-the-right-one") as server:
        responder = responder_for(server, max_retries=5)
        with pytest.raises(InputError, match=f"rejected the API key in {KEY_ENV}"):
            responder.prepare()
        results = generate(responder, make_requests(3))
        assert server.calls == 3
    assert [res.error for _, res in results] == ["AuthenticationError"] * 3


def test_on_result_errors_propagate_and_stop_the_run() -> None:
    def explode(request: Request, result: Result) -> None:
        raise RuntimeError("disk full")

    with FakeOpenAIServer(latency_s=0.01) as server:
        responder = responder_for(server, concurrency=2)
        with pytest.raises(RuntimeError, match="disk full"):
            responder.generate(make_requests(50), GenerationParams(), explode)
        assert server.calls < 10


def test_server_stops_without_leaking_threads() -> None:
    before = set(threading.enumerate())
    with FakeOpenAIServer(faults={"slow": 1.0}, slow_s=30.0) as server:
        generate(responder_for(server, max_retries=0, timeout=0.2), make_requests(4))
        start = time.perf_counter()
    assert time.perf_counter() - start < 2.0  # close() cut the 30 s sleeps short
    assert set(threading.enumerate()) <= before


def test_api_key_never_leaks(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    with FakeOpenAIServer(faults=MIXED_FAULTS, slow_s=2.0, expected_key=SECRET) as server:
        responder = responder_for(server, max_retries=1)
        responder.prepare()
        results = generate(responder, make_requests(100))
        seen += [repr(responder), repr(vars(responder)), str(responder.settings())]
        seen += [repr(result) for _, result in results]
    assert any(result.error for _, result in results)  # failures were part of the run
    for url in (closed_port_url(), "http://127.0.0.1:9/not-here"):
        with pytest.raises(InputError) as err:
            OpenAIResponder(model="m", base_url=url, api_key_env=KEY_ENV, timeout=1.0).prepare()
        seen.append(str(err.value))
    with (
        FakeOpenAIServer(expected_key="sk-the-right-one") as server,
        pytest.raises(InputError) as err,
    ):
        responder_for(server).prepare()
    seen.append(str(err.value))
    captured = capsys.readouterr()
    seen += [captured.out, captured.err, caplog.text]
    seen += [record.getMessage() for record in caplog.records]
    assert any("retrying" in record.getMessage() for record in caplog.records)
    assert not [text for text in seen if SECRET in text or "SECRET" in text]


def test_fake_server_answers_like_openai() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        FakeOpenAIServer(faults={"teapot": 0.1})
    with FakeOpenAIServer() as server:
        conn = http.client.HTTPConnection("127.0.0.1", urlsplit(server.base_url).port)
        chat = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
        replies = []
        for method, path, body in [
            ("POST", "/v1/chat/completions", chat),
            ("POST", "/v1/chat/completions", {"messages": []}),
            ("GET", "/v2/nothing", None),
            ("GET", "/v1/models", None),
        ]:
            conn.request(method, path, json.dumps(body) if body else None)  # one connection
            response = conn.getresponse()
            replies.append((response.status, json.loads(response.read())))
        conn.close()
        assert server.calls == 2
        assert server.calls_by_prompt == Counter({content_hash("hello"): 1})
    assert [status for status, _ in replies] == [200, 400, 404, 200]
    assert replies[0][1]["choices"][0]["message"]["content"] == expected_content("hello")
    assert replies[3][1]["data"][0]["id"] == "fake-model"


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:notaport/v1", "http://127.0.0.1:99999/v1", "ftp://example.com/v1",
     "http:///v1", "http://[::1/v1"],
)  # fmt: skip
def test_a_malformed_base_url_is_refused_when_built(url: str) -> None:
    with pytest.raises(InputError) as err:
        make_responder("openai", model="m", base_url=url)
    assert err.value.field == "base_url" and "\n" not in str(err.value)


def test_cli_bad_port_is_one_line_exit_2(cli, tmp_path: Path) -> None:
    result = cli("generate", "-r", "openai:m@http://127.0.0.1:notaport/v1", "-d",
                 sample_path("valid"), "-o", tmp_path / "c.jsonl", "--no-cache")  # fmt: skip
    assert result.code == 2
    assert result.err == (
        "error: field 'base_url': responder 'openai': http://127.0.0.1:notaport/v1: Port could "
        "not be cast to integer value as 'notaport'\n"
    )
    assert not (tmp_path / "c.jsonl").exists()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("https://sk-SECRET@api.example.com/v1", "https://***@api.example.com/v1"),
        ("https://user:pw-SECRET@host/v1?api-key=SECRET&v=1#SECRET", "https://***@host/v1?***#***"),
        ("http://[::1", "<malformed URL>"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_credentials_in_a_url_are_never_printed(cli, tmp_path: Path) -> None:
    url = closed_port_url().replace("http://", "http://sk-user-SECRET:pw-SECRET@")
    for base_url in (url, url + "?api-key=SECRET", url.replace("/v1", ":notaport/v1")):
        result = cli("generate", "-r", f"openai:m@{base_url}", "-d", sample_path("valid"),
                     "-o", tmp_path / "c.jsonl", "--no-cache")  # fmt: skip
        assert result.code == 2 and len(result.err.splitlines()) == 1
        assert "SECRET" not in result.err and "***@127.0.0.1" in result.err
        assert "SECRET" not in repr(OpenAIResponder(model="m", base_url=url))


def test_replicas_share_the_requests_and_cover_for_a_failing_one() -> None:
    requests = make_requests(200)
    with (
        FakeOpenAIServer(latency_s=0.01) as first,
        FakeOpenAIServer(latency_s=0.01) as second,
        FakeOpenAIServer(faults={"500": 1.0}) as broken,
    ):
        responder = responder_for(first, base_url=[first.base_url, second.base_url],
                                  concurrency=4)  # fmt: skip
        responder.prepare()
        results = generate(responder, requests)
        assert all(r.error is None and r.raw == expected_content(last_user(q)) for q, r in results)
        assert len(results) == 200 and first.calls > 40 and second.calls > 40
        # every attempt the broken replica fails is retried, and a retry may go elsewhere
        mixed = responder_for(first, base_url=[broken.base_url, second.base_url], max_retries=10)
        results = generate(mixed, make_requests(50))
        assert all(r.error is None for _, r in results) and broken.calls > 0
    settings = responder.settings()["base_url"]
    assert settings == sorted([first.base_url, second.base_url])  # replicas, in any order
    with pytest.raises(InputError, match="distinct servers"):
        responder_for(first, base_url=[first.base_url, first.base_url + "/"])


def test_cli_spec_lists_replicas() -> None:
    from persona_align.cli.generate import parse_responder_spec

    defaults = {"api_key_env": "K", "concurrency": 2, "timeout": 5.0}
    _, options = parse_responder_spec("openai:m@http://a:1/v1,http://b:2/v1", **defaults)
    assert options["base_url"] == ["http://a:1/v1", "http://b:2/v1"]
    _, options = parse_responder_spec("openai:m@http://a:1/v1", **defaults)
    assert options["base_url"] == "http://a:1/v1"
    _, options = parse_responder_spec("openai:m", **defaults)
    assert options["base_url"] is None
