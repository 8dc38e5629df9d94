"""An OpenAI-compatible chat server over one reply policy, on FastAPI and uvicorn.

``/v1/chat/completions`` (``stream: true`` sends server-sent events in the format OpenAI's
clients read), ``/v1/models`` and ``/health``. Each request's policy runs on one of
``batch_size`` worker threads; their model calls meet on the engine's model thread, where
greedy replies decode together (``inference.scheduler``). Up to ``queue_size`` more requests
wait for a worker; past that, 503 (which the ``openai`` responder retries). A client that hangs
up, before its reply or in the middle of its stream, has the reply called off: its decoding
slot is free at the next step.

Every client mistake gets a 4xx JSON body in OpenAI's error shape, before any stream starts,
and leaves the server up: malformed JSON, missing or bad fields, a prompt over
``max_prompt_tokens`` → 400, oversize body → 413, unknown model or path → 404, wrong method
→ 405. A streaming reply starts once its first text is known, so errors that the request's
content causes are still plain 4xx replies; a policy that extracts its reply from the whole
output (``persobench``) streams it in one piece at the end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from persona_align.inference.engine import (
    DEFAULT_MAX_TOKENS,
    Cancelled,
    Conversation,
    Reply,
    ReplyError,
    ReplyParams,
    ReplyPolicy,
    Watch,
)
from persona_align.records import Message as ChatTurn

log = logging.getLogger(__name__)

CLIENT_GONE = 499  # nginx's status for a client that hung up before its response


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for; ``batch_size`` requests are answered at once (their
    greedy replies decoding together) and ``queue_size`` more may wait."""

    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 512
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    max_prompt_tokens: int = 2048
    batch_size: int = 8
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
        if self.max_prompt_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_prompt_tokens and batch_size must be >= 1")
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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None


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
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for abuse tracking; it changes nothing here


@dataclass(frozen=True)
class _Parsed:
    conversation: Conversation
    params: ReplyParams
    stream: bool
    include_usage: bool


# --- errors --------------------------------------------------------------------------------


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

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, self.status, self.headers)


class _ClientGone(Exception):
    """The client closed the connection; there is no one to answer."""


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


def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """The router's own 404 and 405, in OpenAI's shape."""
    assert isinstance(exc, HTTPException)
    method, path = request.method, request.url.path
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return ApiError(
            405,
            f"method {method} is not allowed here; use {allowed}",
            code="method_not_allowed",
            headers={"Allow": allowed},
        ).response()
    if exc.status_code == 404:
        return ApiError(404, f"Invalid URL ({method} {path})", code="not_found").response()
    return ApiError(exc.status_code, str(exc.detail), headers=exc.headers).response()


# --- plumbing ------------------------------------------------------------------------------


class _AccessLog:
    """ASGI middleware: one log line per request (method, path, status, seconds) and a count
    by status; a request whose client hung up before any response counts as 499."""

    def __init__(self, app: ASGIApp, statuses: Counter[int]) -> None:
        self.app = app
        self.statuses = statuses

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = CLIENT_GONE

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.statuses[status] += 1
            seconds = time.perf_counter() - began
            log.info("%s %s %d %.2fs", scope["method"], scope["path"], status, seconds)


class _EventStream(StreamingResponse):
    """Server-sent events; ``on_close`` runs however the response ends (the client may hang up
    while an event is being sent, when the event generator itself is not running)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _hung_up(receive: Receive) -> None:
    """Return when the client closes the connection (its body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _Running:
    """A policy's reply running on the worker pool, seen from the event loop: the pieces of
    text it passes on, then None when it is done (``future`` has the reply or the error)."""

    def __init__(self, server: ChatServer, parsed: _Parsed) -> None:
        loop = asyncio.get_running_loop()
        self.pieces: asyncio.Queue[str | None] = asyncio.Queue()
        on_text = (
            (lambda piece: loop.call_soon_threadsafe(self.pieces.put_nowait, piece))
            if parsed.stream
            else None
        )
        self.watch = Watch(on_text)
        self.future = loop.run_in_executor(
            server.worker, server.policy.reply, parsed.conversation, parsed.params, self.watch
        )
        self.future.add_done_callback(lambda _: self.pieces.put_nowait(None))

    async def next(self, receive: Receive | None = None) -> str | None:
        """The next piece of text, or None at the end; with ``receive``, _ClientGone (and the
        reply called off) if the client hangs up first."""
        if receive is None:
            return await self.pieces.get()
        piece = asyncio.ensure_future(self.pieces.get())
        gone = asyncio.ensure_future(_hung_up(receive))
        hung_up = True
        try:
            await asyncio.wait({piece, gone}, return_when=asyncio.FIRST_COMPLETED)
            hung_up = not piece.done()
        finally:
            gone.cancel()
            if hung_up:  # or this request was cancelled
                piece.cancel()
                self.cancel()
        if hung_up:
            raise _ClientGone
        return piece.result()

    def reply(self) -> Reply:
        """The finished reply; ApiError for what went wrong (the future must be done)."""
        try:
            return self.future.result()
        except ReplyError as err:
            raise ApiError(400, err.message, param=err.param, code=err.code) from None
        except asyncio.CancelledError:  # close() dropped it from the queue
            raise ApiError(503, "the server is shutting down", "server_error") from None
        except Cancelled:
            raise _ClientGone from None
        except Exception as err:
            log.exception("generation failed")
            raise ApiError(
                500, f"generation failed ({type(err).__name__})", "server_error"
            ) from None

    def cancel(self) -> None:
        """Call the reply off: its slot is freed at the next step; not started, it never is."""
        self.watch.cancel()
        self.future.cancel()


# --- the server ----------------------------------------------------------------------------


class ChatServer:
    """Serves one ``ReplyPolicy`` as ``model_id`` on ``host:port`` (port 0: a free one).

    ``start()`` returns once the server listens, on a background thread; ``close()`` stops it,
    answering queued requests with 503 and letting the ones being generated finish.
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
        self.worker = ThreadPoolExecutor(
            max_workers=self.limits.batch_size, thread_name_prefix="persona-reply"
        )
        self._statuses: Counter[int] = Counter()
        self._pending = 0  # requests replying or waiting; touched on the event loop only
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> ChatServer:
        """Bind and listen; OSError (port in use, ...) is raised here."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family, backlog=256)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            _AccessLog(self.app, self._statuses),
            http="h11",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=30,
        )
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [sock]}, name="persona-http"
        )
        self._thread.start()
        while not self._uvicorn.started:
            if not self._thread.is_alive():
                raise RuntimeError("the HTTP server stopped while starting")
            time.sleep(0.01)
        return self

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def pending(self) -> int:
        """Requests being answered or waiting for a worker."""
        return self._pending

    def stats(self) -> dict[str, Any]:
        """Requests answered so far, by HTTP status (499: the client hung up first)."""
        statuses = dict(self._statuses)
        return {"requests": sum(statuses.values()), "by_status": statuses}

    def close(self) -> None:
        if self._uvicorn is None or self._thread is None:
            return
        self.worker.shutdown(wait=False, cancel_futures=True)  # running replies finish
        self._uvicorn.should_exit = True
        self._thread.join()
        self.worker.shutdown(wait=True)
        self._uvicorn = None

    def __enter__(self) -> ChatServer:
        return self.start() if self._uvicorn is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- HTTP ------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="persona-align", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(ApiError, _api_error)
        app.add_exception_handler(HTTPException, _http_error)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{model:path}")
        async def model(model: str) -> dict[str, Any]:
            self._check_model(model, param=None)
            return self._model_card()

        @app.get("/health")
        async def health() -> dict[str, Any]:
            engine = getattr(self.policy, "engine", None)
            return {
                "status": "ok",
                "model": self.model_id,
                "pending": self._pending,
                "engine": engine.stats() if engine is not None else {},
            }

        @app.post("/v1/chat/completions")
        async def completions(request: Request) -> Response:
            try:
                return await self._complete(request)
            except _ClientGone:
                return Response(status_code=CLIENT_GONE)
            except ApiError:
                raise
            except Exception as err:  # a bug of ours: answer, log, and stay up
                log.exception("%s %s failed", request.method, request.url.path)
                raise ApiError(
                    500, f"internal error ({type(err).__name__})", "server_error"
                ) from None

        return app

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

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) past ``max_body_bytes`` before or while it is read."""
        limit = self.limits.max_body_bytes
        too_large = ApiError(
            413,
            f"the body is over {limit} bytes, the most this server takes",
            code="request_too_large",
            headers={"Connection": "close"},  # the rest of the body stays unread
        )
        if int(request.headers.get("content-length", "0")) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.limits.read_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(
                408, "the body did not arrive in time", headers={"Connection": "close"}
            ) from None
        except ClientDisconnect:
            raise _ClientGone from None
        return b"".join(chunks)

    def _parse(self, body: bytes) -> _Parsed:
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
        if request.stream_options is not None and not request.stream:
            raise ApiError(
                400,
                "stream_options: only allowed when stream is true",
                param="stream_options",
            )
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
            max_prompt_tokens=self.limits.max_prompt_tokens,
        )
        messages = [ChatTurn(role=m.role, content=m.content) for m in request.messages]
        try:
            conversation = Conversation.from_messages(messages)
            self.policy.validate(conversation)
        except ReplyError as err:
            raise ApiError(400, err.message, param=err.param, code=err.code) from None
        options = request.stream_options
        return _Parsed(
            conversation,
            params,
            stream=bool(request.stream),
            include_usage=bool(options and options.include_usage),
        )

    async def _complete(self, request: Request) -> Response:
        parsed = self._parse(await self._read_body(request))
        if self._pending >= self.limits.batch_size + self.limits.queue_size:
            raise ApiError(
                503,
                f"the server is busy ({self._pending} requests in line); retry shortly",
                "server_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self._pending += 1
        streaming = False
        try:
            running = _Running(self, parsed)
            first = await running.next(request.receive)
            if first is None:  # done before any text: errors are still plain HTTP errors
                reply = running.reply()
                if not parsed.stream:
                    return JSONResponse(self._completion(reply))
            streaming = True
            return _EventStream(
                self._events(running, parsed, first), on_close=lambda: self._closed(running)
            )
        finally:
            if not streaming:
                self._pending -= 1

    def _closed(self, running: _Running) -> None:
        running.cancel()  # a no-op once the reply is done
        self._pending -= 1

    # --- replies ---------------------------------------------------------------------------

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
            "usage": _usage(reply),
            "persona_align": _extra(reply),
        }

    async def _events(
        self, running: _Running, parsed: _Parsed, first: str | None
    ) -> AsyncIterator[str]:
        """The stream of a reply: a role chunk, a chunk per piece of text, the rest of the
        content once the reply is done, a chunk with the finish reason, the usage if asked,
        ``[DONE]``. An error after the first piece is sent as an error event."""
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model_id,
        }

        def event(body: dict[str, Any]) -> str:
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return event(head | {"choices": [choice]} | extra)

        yield chunk({"role": "assistant", "content": ""})
        sent = ""
        piece = first
        while piece is not None:
            sent += piece
            yield chunk({"content": piece})
            piece = await running.next()
        try:
            reply = running.reply()
        except ApiError as err:
            yield event(err.body)
            return
        if reply.content.startswith(sent) and len(reply.content) > len(sent):
            yield chunk({"content": reply.content[len(sent) :]})
        yield chunk({}, reply.finish_reason, persona_align=_extra(reply))
        if parsed.include_usage:
            yield event(head | {"choices": [], "usage": _usage(reply)})
        yield "data: [DONE]\n\n"


def _usage(reply: Reply) -> dict[str, int]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }


def _extra(reply: Reply) -> dict[str, Any]:
    """Not OpenAI's: how the reply was made, and the model's own output."""
    return {
        "policy": reply.policy,
        "extracted": reply.extracted,
        "raw": reply.raw,
        "latency_s": round(reply.latency_s, 4),
    }
