"""A small OpenAI-compatible chat server on 127.0.0.1 for tests and benchmarks (stdlib only).

Replies are a pure function of the prompt, so tests can predict them. Faults (rate limits,
server errors, hangs, garbage bodies, dropped connections) are drawn per attempt from a hash of
(seed, prompt, attempt number), so a run is reproducible whatever order concurrent requests
arrive in, and a retried request draws again.

The server runs on one background event loop (``testing.httpd``): benchmarks run it in the
client's process, where a thread per connection would fight the client's loop for the GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from persona_align.testing.httpd import BackgroundServer, parse_head

FAULT_KINDS = ("429", "500", "slow", "malformed", "drop")
MODEL_ID = "fake-model"


def content_hash(text: str) -> str:
    """The key of ``calls_by_prompt``: sha256 of the last user message."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def expected_content(text: str) -> str:
    """The assistant message the server sends when the last user message is ``text``."""
    return json.dumps({"response": f"echo {content_hash(text)[:8]}"})


class _Reply:
    """A response to write; ``None`` in its place means hang up without one."""

    def __init__(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.headers = headers or {}

    def encode(self) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(self.body)}",
            *(f"{name}: {value}" for name, value in self.headers.items()),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> _Reply:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return _Reply(status, body, headers)


class FakeOpenAIServer(BackgroundServer):
    """Serves ``/v1/models`` and ``/v1/chat/completions`` on a free loopback port until closed.

    ``faults`` maps kinds in FAULT_KINDS to the fraction of attempts that get them: ``429``
    (with ``Retry-After: retry_after`` unless that is None), ``500``, ``slow`` (the reply
    comes after ``slow_s``, later than a client timeout), ``malformed`` (200 with a body that
    is not JSON) and ``drop`` (the connection closes with no reply). ``faulty_attempts``
    limits faults to the first attempts of each prompt (1: only the first attempt can fail).
    With ``expected_key`` set, requests without ``Authorization: Bearer <key>`` get 401.
    ``answer(last user message)`` is the assistant's content (default ``expected_content``).
    """

    thread_name = "fake-openai"

    def __init__(
        self,
        latency_s: float = 0.0,
        faults: dict[str, float] | None = None,
        seed: int = 0,
        expected_key: str | None = None,
        *,
        slow_s: float = 5.0,
        retry_after: float | None = 0.0,
        faulty_attempts: int | None = None,
        answer: Callable[[str], str] = expected_content,
    ) -> None:
        faults = dict(faults or {})
        unknown = sorted(set(faults) - set(FAULT_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; choose from {FAULT_KINDS}")
        if any(f < 0 for f in faults.values()) or sum(faults.values()) > 1:
            raise ValueError(f"fault fractions must be >= 0 and sum to at most 1, got {faults}")
        self.latency_s = latency_s
        self.faults = faults
        self.seed = seed
        self.expected_key = expected_key
        self.slow_s = slow_s
        self.retry_after = retry_after
        self.faulty_attempts = faulty_attempts
        self.answer = answer
        super().__init__()
        self._lock = threading.Lock()  # the counters are written on the loop, read anywhere
        self._calls = 0
        self._calls_by_prompt: Counter[str] = Counter()
        self._port = self._start("127.0.0.1", 0)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    @property
    def calls(self) -> int:
        """Chat-completion requests received, including those answered with a fault."""
        with self._lock:
            return self._calls

    @property
    def calls_by_prompt(self) -> Counter[str]:
        """A snapshot: attempts per ``content_hash`` of the last user message."""
        with self._lock:
            return Counter(self._calls_by_prompt)

    def fault_for(self, text: str, attempt: int) -> str | None:
        """The fault (or None) of the ``attempt``-th call (from 0) for this last user message."""
        if self.faulty_attempts is not None and attempt >= self.faulty_attempts:
            return None
        digest = hashlib.sha256(f"{self.seed}:{attempt}:{text}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        for kind, fraction in self.faults.items():
            if u < fraction:
                return kind
            u -= fraction
        return None

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer requests on one keep-alive connection until either side closes it."""
        with contextlib.suppress(asyncio.LimitOverrunError, ValueError):  # not parseable: hang up
            while not self.closing:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, _version, headers = parse_head(head)
                length = int(headers.get("content-length", "0") or 0)
                body = await reader.readexactly(length) if length else b""
                reply = await self._answer(method, path, headers, body)
                if reply is None or self.closing:
                    return
                writer.write(reply.encode())
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    return

    async def _answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> _Reply | None:
        if (method, path) == ("GET", "/v1/models"):
            model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "persona-align"}
            return self._unauthorized(headers) or _Reply(200, {"object": "list", "data": [model]})
        if (method, path) != ("POST", "/v1/chat/completions"):
            return _error(404, f"no route {method} {path}", "not_found")
        try:
            payload = json.loads(body)
            text = next(m["content"] for m in reversed(payload["messages"]) if m["role"] == "user")
        except (ValueError, KeyError, TypeError, StopIteration):
            self._count(None)
            return _error(400, "expected a chat request", "invalid_request_error")
        attempt = self._count(text)
        unauthorized = self._unauthorized(headers)
        if unauthorized:
            return unauthorized
        fault = self.fault_for(text, attempt)
        if fault == "drop":
            return None
        if fault == "429":
            after = {} if self.retry_after is None else {"Retry-After": f"{self.retry_after:g}"}
            return _error(429, "slow down", "rate_limit_exceeded", after)
        if fault == "500":
            return _error(500, "injected failure", "server_error")
        await self._pause(self.slow_s if fault == "slow" else self.latency_s)
        if fault == "malformed":
            return _Reply(200, b'{"id": "chatcmpl-broken", "choices": [')
        content = self.answer(text)
        return _Reply(200, _completion(text, content, attempt, payload.get("model", MODEL_ID)))

    def _unauthorized(self, headers: dict[str, str]) -> _Reply | None:
        expected = self.expected_key
        if expected is None or headers.get("authorization") == f"Bearer {expected}":
            return None
        # like OpenAI's, but without quoting the key back
        return _error(401, "invalid API key", "invalid_request_error")

    def _count(self, text: str | None) -> int:
        """Record a call; returns how many earlier attempts this prompt had."""
        with self._lock:
            self._calls += 1
            if text is None:
                return 0
            key = content_hash(text)
            attempt = self._calls_by_prompt[key]
            self._calls_by_prompt[key] += 1
            return attempt


def _completion(text: str, content: str, attempt: int, model: Any) -> dict[str, Any]:
    prompt_tokens = len(text.split())
    return {
        "id": f"chatcmpl-{attempt}-{content_hash(text)[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 4,
            "total_tokens": prompt_tokens + 4,
        },
    }
