"""An OpenAI-compatible chat server over one model: ``/v1/models`` and ``/v1/chat/completions``.

Standard library only: asyncio streams on one background thread (``persona_align.httpd``)
take the HTTP; the model is not thread-safe, so every reply is
generated on one worker thread, with a bounded queue in front of it (503 when full, which the
``openai`` responder retries). Every client mistake gets a 4xx JSON body in OpenAI's error
shape and leaves the server up: malformed JSON, missing or bad fields → 400, oversize body
→ 413, unknown model or path → 404, wrong method → 405.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Literal
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from persona_align.httpd import BackgroundServer, parse_head
from persona_align.inference.engine import (
    DEFAULT_MAX_TOKENS,
    Conversation,
    Reply,
    ReplyError,
    ReplyParams,
    ReplyPolicy,
)
from persona_align.records import Message

log = logging.getLogger(__name__)

MODELS_PATH = "/v1/models"
COMPLETIONS_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; ``queue_size`` requests may wait behind the running one."""

    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 512
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    queue_size: int = 8
    read_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if min(self.max_body_bytes, self.max_tokens_cap, self.default_max_tokens) < 1:
            raise ValueError("max_body_bytes, max_tokens_cap and default_max_tokens must be >= 1")
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(
                f"default_max_tokens {self.default_max_tokens} is over "
                f"max_tokens_cap {self.max_tokens_cap}"
            )
        if self.queue_size < 0 or self.read_timeout_s <= 0:
            raise ValueError("queue_size must be >= 0 and read_timeout_s > 0")


# --- the request, as OpenAI defines it (the part this server honours) ----------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """OpenAI also sends content as a list of ``{"type": "text", "text": ...}`` parts."""
        if isinstance(value, list):
            if all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in value
            ):
                return "\n".join(p["text"] for p in value)
            raise ValueError("only text content parts are supported")
        return value


class ChatRequest(BaseModel):
    """Unknown parameters are refused rather than ignored: each one would change the reply."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    user: str | None = None  # an end-user id for abuse tracking; it changes nothing here


# --- responses -----------------------------------------------------------------------------


class ApiError(Exception):
    """An HTTP error reply in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        self.headers = headers or {}


@dataclass
class _Response:
    status: int
    body: Any
    headers: dict[str, str] | None = None

    def encode(self, keep_alive: bool) -> bytes:
        body = json.dumps(self.body, ensure_ascii=False).encode("utf-8")
        lines = [
            f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
            *(f"{name}: {value}" for name, value in (self.headers or {}).items()),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _of_error(err: ApiError) -> _Response:
    return _Response(err.status, err.body, err.headers)


def _param_of(loc: tuple[Any, ...]) -> str:
    """``("messages", 0, "role")`` → ``messages[0].role``, as OpenAI names parameters."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_error(err: ValidationError) -> ApiError:
    first = err.errors()[0]
    param = _param_of(first["loc"])
    if first["type"] == "extra_forbidden":
        message = f"unsupported parameter: {param}"
    elif first["type"] == "missing":
        message = f"missing required parameter: {param}"
    else:
        message = f"{param}: {first['msg'].removeprefix('Value error, ')}"
    more = len(err.errors()) - 1
    if more:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return ApiError(400, message, param=param)


class ChatServer(BackgroundServer):
    """Serves one ``ReplyPolicy`` as ``model_id`` on ``host:port`` (port 0: a free one).

    ``start()`` returns at once with the server listening on a background thread; ``close()``
    stops it, cancelling queued requests and letting the one being generated finish.
    """

    def __init__(
        self,
        policy: ReplyPolicy,
        model_id: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        limits: ServerLimits | None = None,
    ) -> None:
        self.policy = policy
        self.model_id = model_id
        self.host = host
        self.port = port
        self.limits = limits or ServerLimits()
        self.created = int(time.time())
        self._statuses: Counter[int] = Counter()
        self._pending = 0  # requests generating or waiting; touched on the loop thread only
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="persona-generate")
        super().__init__()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> ChatServer:
        """Bind and listen; OSError (port in use, ...) is raised here."""
        self.port = self._start(self.host, self.port)
        return self

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def pending(self) -> int:
        """Requests being generated or waiting for the worker."""
        return self._pending

    def stats(self) -> dict[str, Any]:
        """Requests answered so far, by HTTP status."""
        statuses = dict(self._statuses)
        return {"requests": sum(statuses.values()), "by_status": statuses}

    def close(self) -> None:
        super().close()
        self._worker.shutdown(wait=True)

    def __enter__(self) -> ChatServer:
        return self.start() if self._loop is None else self

    def _on_shutdown(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)  # the running reply finishes

    # --- HTTP ------------------------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer requests on one keep-alive connection until either side closes it."""
        keep_alive = True
        while keep_alive and not self.closing:
            try:
                async with asyncio.timeout(self.limits.read_timeout_s):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                await self._send(writer, _of_error(ApiError(431, "request head too large")))
                return
            began = time.perf_counter()
            method, path, response, keep_alive = await self._handle(head, reader, writer)
            await self._send(writer, response, keep_alive)
            log.info("%s %s %d %.2fs", method, path, response.status, time.perf_counter() - began)

    async def _send(
        self, writer: asyncio.StreamWriter, response: _Response, keep_alive: bool = False
    ) -> None:
        self._statuses[response.status] += 1
        writer.write(response.encode(keep_alive))
        await writer.drain()

    async def _handle(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[str, str, _Response, bool]:
        """(method, path, response, keep the connection open?) for one request."""
        try:
            method, target, version, headers = parse_head(head)
        except ValueError:
            return "-", "-", _of_error(ApiError(400, "malformed HTTP request")), False
        path = target.split("?", 1)[0]
        connection = headers.get("connection", "").lower()
        keep_alive = connection == "keep-alive" or (version == "HTTP/1.1" and connection != "close")
        if "transfer-encoding" in headers:
            error = ApiError(411, "chunked bodies are not supported; send Content-Length")
            return method, path, _of_error(error), False
        try:
            length = int(headers.get("content-length", "0"))
            if length < 0:
                raise ValueError(length)
        except ValueError:
            return method, path, _of_error(ApiError(400, "malformed Content-Length")), False
        if length > self.limits.max_body_bytes:
            error = ApiError(
                413,
                f"the body has {length} bytes; this server takes at most "
                f"{self.limits.max_body_bytes}",
                code="request_too_large",
            )
            return method, path, _of_error(error), False  # the body stays unread: hang up
        if length and headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        async with asyncio.timeout(self.limits.read_timeout_s):
            body = await reader.readexactly(length) if length else b""
        try:
            response = await self._route(method, path, body)
        except ApiError as err:
            response = _of_error(err)
        except Exception as err:  # a bug of ours: answer, log, and stay up
            log.exception("%s %s failed", method, path)
            response = _of_error(
                ApiError(500, f"internal error ({type(err).__name__})", "server_error")
            )
        return method, path, response, keep_alive

    async def _route(self, method: str, path: str, body: bytes) -> _Response:
        if path == MODELS_PATH:
            self._allow(method, "GET")
            return _Response(200, {"object": "list", "data": [self._model_card()]})
        if path.startswith(MODELS_PATH + "/"):
            self._allow(method, "GET")
            self._check_model(unquote(path[len(MODELS_PATH) + 1 :]), param=None)
            return _Response(200, self._model_card())
        if path == COMPLETIONS_PATH:
            self._allow(method, "POST")
            return await self._complete(body)
        raise ApiError(404, f"Invalid URL ({method} {path})", code="not_found")

    @staticmethod
    def _allow(method: str, allowed: str) -> None:
        if method != allowed:
            raise ApiError(
                405,
                f"method {method} is not allowed here; use {allowed}",
                code="method_not_allowed",
                headers={"Allow": allowed},
            )

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "persona-align",
        }

    def _check_model(self, model: str, param: str | None = "model") -> None:
        if model != self.model_id:
            raise ApiError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.model_id}`",
                param=param,
                code="model_not_found",
            )

    # --- chat completions ------------------------------------------------------------------

    def _parse(self, body: bytes) -> tuple[Conversation, ReplyParams]:
        """The request as a conversation and decoding settings, or an ApiError naming the field."""
        try:
            payload = json.loads(body)
        except ValueError as err:
            raise ApiError(400, f"the body is not valid JSON: {err}") from None
        if not isinstance(payload, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(payload).__name__}")
        try:
            request = ChatRequest.model_validate(payload)
        except ValidationError as err:
            raise _validation_error(err) from None
        self._check_model(request.model)
        if request.n not in (None, 1):
            raise ApiError(400, "n: only one choice per request is supported", param="n")
        if request.stream:
            raise ApiError(400, "stream: streaming is not supported", param="stream")
        param, max_tokens = "max_tokens", self.limits.default_max_tokens
        if request.max_completion_tokens is not None:
            param, max_tokens = "max_completion_tokens", request.max_completion_tokens
        elif request.max_tokens is not None:
            max_tokens = request.max_tokens
        if max_tokens > self.limits.max_tokens_cap:
            raise ApiError(
                400,
                f"{param} is {max_tokens}; this server generates at most "
                f"{self.limits.max_tokens_cap} tokens",
                param=param,
            )
        params = ReplyParams(
            max_tokens=max_tokens,
            temperature=0.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
        )
        messages = [Message(role=m.role, content=m.content) for m in request.messages]
        try:
            conversation = Conversation.from_messages(messages)
            self.policy.validate(conversation)
        except ReplyError as err:
            raise ApiError(400, err.message, param=err.param, code=err.code) from None
        return conversation, params

    async def _complete(self, body: bytes) -> _Response:
        conversation, params = self._parse(body)
        if self._pending > self.limits.queue_size:
            raise ApiError(
                503,
                f"the server is busy ({self._pending} requests in line); retry shortly",
                "server_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            reply = await loop.run_in_executor(
                self._worker, self.policy.reply, conversation, params
            )
        except ReplyError as err:
            raise ApiError(400, err.message, param=err.param, code=err.code) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # the queued job was cancelled by close(), not this handler
            raise ApiError(503, "the server is shutting down", "server_error") from None
        except Exception as err:
            log.exception("generation failed")
            raise ApiError(
                500, f"generation failed ({type(err).__name__})", "server_error"
            ) from None
        finally:
            self._pending -= 1
        return _Response(200, self._completion(reply))

    def _completion(self, reply: Reply) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.content},
                    "finish_reason": reply.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            },
            # not OpenAI's: how the reply was made, and the model's own output
            "persona_align": {
                "policy": reply.policy,
                "extracted": reply.extracted,
                "raw": reply.raw,
                "latency_s": round(reply.latency_s, 4),
            },
        }
