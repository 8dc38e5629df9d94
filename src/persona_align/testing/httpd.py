"""A tiny HTTP/1.1 server base: asyncio streams on one background thread (standard library).

The base of ``testing.fake_server`` (the test OpenAI server with fault injection, whose
faults — garbage bodies, dropped connections, hangs — need a server that writes its own
bytes; ``persona-align serve`` runs on FastAPI/uvicorn). It runs inside a process that has its
own work to do (a benchmark's client loop): one event-loop thread costs less than a thread per
connection (measured ~10% more requests per second against ``ThreadingHTTPServer``). A
subclass answers the requests of one keep-alive connection in ``_serve_connection``; this class
owns the loop, the listening socket, the open connections and a shutdown that wakes sleeping
handlers instead of cancelling them (Python 3.11's ``start_server`` logs cancelled handlers as
errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType
from typing import Self


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Method, target, version and lower-cased headers; ValueError when it is not HTTP/1.x."""
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, version = request_line.split(" ")
    if not version.startswith("HTTP/1.") or not target.startswith("/"):
        raise ValueError(request_line)
    headers = {}
    for line in lines:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(line)
            headers[name.strip().lower()] = value.strip()
    return method, target, version, headers


class BackgroundServer:
    """Listens on a background event loop from ``_start`` until ``close``."""

    thread_name = "persona-http"

    def __init__(self) -> None:
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._closing: asyncio.Event | None = None  # set on close: handlers stop waiting

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer requests on one connection until either side is done with it."""
        raise NotImplementedError

    def _start(self, host: str, port: int) -> int:
        """Bind and listen (OSError here: port in use, ...); returns the bound port."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.thread_name)
        self._thread.start()
        try:
            listen = self._listen(host, port)
            self._server = asyncio.run_coroutine_threadsafe(listen, self._loop).result()
        except BaseException:
            self._stop_loop()
            raise
        return self._server.sockets[0].getsockname()[1]

    async def _listen(self, host: str, port: int) -> asyncio.Server:
        self._closing = asyncio.Event()
        return await asyncio.start_server(self._tracked, host, port, backlog=256)

    async def _tracked(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            await self._serve_connection(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            return  # the client hung up or went quiet
        finally:
            del self._connections[task]
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @property
    def closing(self) -> bool:
        return self._closing is not None and self._closing.is_set()

    async def _pause(self, seconds: float) -> None:
        """Sleep, unless close() comes first."""
        if seconds > 0 and self._closing is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._closing.wait()

    def close(self) -> None:
        """Stop listening, cut sleeping and idle connections short, and end the thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result()
        self._stop_loop()

    async def _shutdown(self) -> None:
        assert self._server is not None and self._closing is not None
        self._server.close()
        self._closing.set()
        for writer in self._connections.values():
            writer.close()  # idle keep-alive reads see end of file
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    def _stop_loop(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
