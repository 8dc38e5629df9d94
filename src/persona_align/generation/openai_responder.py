"""The ``openai`` responder: any OpenAI-compatible chat server (OpenAI, vLLM, llama.cpp, ...).

Retries are ours, not the SDK's, so that we decide what is transient, honour Retry-After, keep
the concurrency slot free while backing off, and turn a request that keeps failing into an
error Result instead of an exception that would stop the whole run.

The ``openai`` package is imported only when the responder is used, so that registering it
costs nothing to users of local models.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections import Counter
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import BaseModel

from persona_align.errors import InputError, redact_url
from persona_align.generation.base import (
    GenerationParams,
    OnResult,
    Request,
    Responder,
    Result,
    register_responder,
)

if TYPE_CHECKING:
    import openai

log = logging.getLogger(__name__)

OPENAI_API_URL = "https://api.openai.com/v1"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
LOCAL_PLACEHOLDER_KEY = "EMPTY"  # what vLLM and llama.cpp accept when started without a key
RETRYABLE_STATUS = frozenset({408, 409, 429})  # and every 5xx
RETRY_AFTER_STATUS = frozenset({429, 503})
PREPARE_TIMEOUT_S = 10.0


class MalformedResponseError(Exception):
    """A successful status with a body that is not a chat completion; proxies do garble bodies."""


class _Secret:
    """Holds the API key so that no repr, log line or traceback with locals can show it."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<secret>"


def _openai() -> Any:
    try:
        import openai
    except ImportError:
        raise InputError(
            None, "the openai responder needs the 'openai' package: pip install openai"
        ) from None
    return openai


def spec_base_url(text: str) -> str | list[str] | None:
    """The URL part of ``openai:MODEL@URL[,URL...]``: one server, several replicas, or none."""
    urls = [url.strip() for url in text.split(",") if url.strip()]
    return None if not urls else urls[0] if len(urls) == 1 else urls


def _check_url(url: str, shown: str) -> None:
    """Refuse a base URL the HTTP client would choke on (no host, a port that is no number)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as err:
        raise InputError(None, f"responder 'openai': {shown}: {err}", field="base_url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(None, f"responder 'openai': {shown} is not an http(s) URL with a host",
                         field="base_url")  # fmt: skip


def _error_name(err: BaseException) -> str:
    """The class of an error and of its cause: messages may quote headers, so they stay out."""
    cause = err.__cause__
    return f"{type(err).__name__} ({type(cause).__name__})" if cause else type(err).__name__


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare enough to fall back to our own backoff
    return seconds if seconds is not None and seconds >= 0 else None


def _reply_of(completion: object) -> tuple[str, dict[str, int]]:
    """The message text and token counts of a completion, which the SDK does not validate."""
    choices = getattr(completion, "choices", None)
    message = (
        getattr(choices[0], "message", None) if isinstance(choices, list) and choices else None
    )
    content = getattr(message, "content", None)
    if message is None or not isinstance(content, str | None):
        raise MalformedResponseError("the reply has no choices[0].message")
    usage = getattr(completion, "usage", None)
    counts = usage.model_dump() if isinstance(usage, BaseModel) else {}
    return content or "", {k: v for k, v in counts.items() if type(v) is int}


@register_responder("openai")
class OpenAIResponder(Responder):
    """Chat completions from an OpenAI-compatible server, ``concurrency`` requests at a time.

    ``base_url`` may list several servers of the same model (e.g. vLLM replicas): each gets
    ``concurrency`` requests in flight, a request goes to whichever server has a free slot, and
    a retry may land on another server. The key is read from the environment variable
    ``api_key_env``, never from the config, so that configs and run manifests can be shared.
    """

    kind = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | list[str] | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        name: str | None = None,
    ) -> None:
        checks = [
            (bool(model), "model must not be empty"),
            (bool(api_key_env), "api_key_env must not be empty"),
            (concurrency >= 1, f"concurrency must be at least 1, got {concurrency}"),
            (timeout > 0, f"timeout must be positive, got {timeout}"),
            (max_retries >= 0, f"max_retries must not be negative, got {max_retries}"),
            (backoff_base >= 0, f"backoff_base must not be negative, got {backoff_base}"),
            (backoff_max >= 0, f"backoff_max must not be negative, got {backoff_max}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(None, f"responder 'openai': {message}")
        super().__init__(name or model)
        self.model = model
        # Explicit, not OPENAI_BASE_URL: the server is part of the cache key, so the config
        # must name it.
        urls = [base_url] if isinstance(base_url, str) else list(base_url or [OPENAI_API_URL])
        self.base_urls = [url.rstrip("/") for url in urls]
        self.shown_urls = [redact_url(url) for url in self.base_urls]  # for messages and logs
        if not self.base_urls or len(set(self.base_urls)) < len(self.base_urls):
            raise InputError(None, f"responder 'openai': base_url must list distinct servers, "
                             f"got {self.shown_urls}", field="base_url")  # fmt: skip
        for url, shown in zip(self.base_urls, self.shown_urls, strict=True):
            _check_url(url, shown)
        self.shown_url = ", ".join(self.shown_urls)
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._api_key: _Secret | None = None

    def __repr__(self) -> str:
        shown = f"name={self.name!r}, model={self.model!r}, base_url={self.shown_url!r}"
        return f"OpenAIResponder({shown})"

    def settings(self) -> dict[str, Any]:
        # replicas of one model answer alike: which ones, not their order, names the outputs
        urls = self.base_urls[0] if len(self.base_urls) == 1 else sorted(self.base_urls)
        return {"kind": self.kind, "model": self.model, "base_url": urls}

    def prepare(self) -> None:
        """Check the key and that the server answers, so that a bad config fails before any work."""
        self._api_key = self._read_key()
        asyncio.run(self._check_server())

    def generate(
        self, requests: list[Request], params: GenerationParams, on_result: OnResult
    ) -> None:
        if self._api_key is None:  # prepare() is optional
            self._api_key = self._read_key()
        if requests:
            asyncio.run(self._generate_all(requests, params, on_result))

    # --- internals -----------------------------------------------------------------------

    def _read_key(self) -> _Secret:
        value = os.environ.get(self.api_key_env)
        if value:
            return _Secret(value)
        if all(urlsplit(url).hostname in LOCAL_HOSTS for url in self.base_urls):
            return _Secret(LOCAL_PLACEHOLDER_KEY)
        raise InputError(
            None,
            f"environment variable {self.api_key_env} is not set; "
            f"it must hold the API key for {self.shown_url}",
        )

    def _client(self, url: str, timeout: float) -> openai.AsyncOpenAI:
        assert self._api_key is not None
        return _openai().AsyncOpenAI(
            api_key=self._api_key.value, base_url=url, max_retries=0, timeout=timeout
        )

    async def _check_server(self) -> None:
        for url, shown in zip(self.base_urls, self.shown_urls, strict=True):
            await self._check_one(url, shown)

    async def _check_one(self, url: str, shown: str) -> None:
        openai = _openai()
        async with self._client(url, min(self.timeout, PREPARE_TIMEOUT_S)) as client:
            try:
                await client.models.list()
            except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
                raise InputError(
                    None,
                    f"server at {self.shown_url} rejected the API key in {self.api_key_env} "
                    f"(HTTP {err.status_code})",
                ) from None
            except openai.NotFoundError:
                raise InputError(
                    None,
                    f"no OpenAI-compatible API at {self.shown_url} (GET /models: HTTP 404); "
                    "does base_url end in /v1?",
                ) from None
            except openai.APIStatusError as err:
                log.debug("GET %s/models answered HTTP %d", self.shown_url, err.status_code)
            except openai.APIConnectionError as err:
                raise InputError(
                    None,
                    f"cannot reach OpenAI-compatible server at {self.shown_url}: "
                    f"{_error_name(err)}",
                ) from None

    async def _generate_all(
        self, requests: list[Request], params: GenerationParams, on_result: OnResult
    ) -> None:
        failures: Counter[str] = Counter()
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(self._client(url, self.timeout))
                       for url in self.base_urls]  # fmt: skip
            slots: asyncio.Queue[openai.AsyncOpenAI] = asyncio.Queue()
            for _ in range(self.concurrency):  # a free slot is a client, taken and given back
                for client in clients:
                    slots.put_nowait(client)

            async def answer(request: Request) -> None:
                result = await self._answer(slots, request, params)
                if result.error is not None:
                    failures[result.error] += 1
                on_result(request, result)

            tasks = [asyncio.create_task(answer(request)) for request in requests]
            try:
                await asyncio.gather(*tasks)
            finally:  # on_result raised, or we were interrupted: stop the rest cleanly
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        if failures:
            summary = ", ".join(f"{name} x{count}" for name, count in failures.most_common())
            log.warning(
                "%s: %d of %d requests failed: %s",
                self.name,
                failures.total(),
                len(requests),
                summary,
            )

    async def _answer(
        self,
        slots: asyncio.Queue[openai.AsyncOpenAI],
        request: Request,
        params: GenerationParams,
    ) -> Result:
        """One request through its retries; the slot is held while calling, not while waiting."""
        openai = _openai()
        messages = [m.model_dump() for m in request.messages]
        attempt = 0
        while True:
            client = await slots.get()
            try:
                start = time.perf_counter()
                try:
                    async with asyncio.timeout(self.timeout):
                        completion = await client.chat.completions.create(
                            model=self.model,
                            messages=messages,
                            max_tokens=params.max_new_tokens,
                            temperature=params.temperature,
                            top_p=params.top_p,
                            seed=params.seed,
                        )
                    raw, usage = _reply_of(completion)
                except (
                    json.JSONDecodeError,
                    UnicodeDecodeError,
                    openai.APIResponseValidationError,
                ):
                    error: Exception = MalformedResponseError("the reply body is not valid JSON")
                except (openai.OpenAIError, TimeoutError, MalformedResponseError) as err:
                    error = err
                else:
                    return Result(raw=raw, latency_s=time.perf_counter() - start, usage=usage)
            finally:
                slots.put_nowait(client)
            delay = self._retry_delay(error, attempt)
            if delay is None or attempt == self.max_retries:
                log.debug("%s: %s failed: %s", self.name, request.dialogue.id, _error_name(error))
                return Result(error=type(error).__name__)
            attempt += 1
            log.debug(
                "%s: %s attempt %d failed (%s), retrying in %.2fs",
                self.name,
                request.dialogue.id,
                attempt,
                _error_name(error),
                delay,
            )
            await asyncio.sleep(delay)

    def _retry_delay(self, err: Exception, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None when retrying cannot help."""
        openai = _openai()
        if isinstance(err, openai.APIStatusError):
            status = err.status_code
            if status < 500 and status not in RETRYABLE_STATUS:
                return None
            if status in RETRY_AFTER_STATUS:
                after = _retry_after(err.response.headers.get("retry-after"))
                if after is not None:
                    return min(after, self.backoff_max)
        elif not isinstance(err, openai.APIConnectionError | TimeoutError | MalformedResponseError):
            return None
        # exponential backoff with full jitter, so that throttled workers do not retry in step
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))
