"""The frontend's HTTP/1.1 server: an asyncio protocol around the httptools parser.

The OpenAI surface needs little of HTTP, and a general framework's request and response objects
cost a large share of the frontend's CPU at thousands of streamed requests a second. This server
does what that surface needs: keep-alive and pipelined requests (answered in order), request
bodies up to a limit (by Content-Length or chunked, ``Expect: 100-continue`` answered), whole
responses with a Content-Length, streamed ones in chunked encoding (close-delimited for HTTP/1.0
clients), HEAD on GET routes, the handler cancelled when its client goes away, idle connections
closed, and a drain on close: stop accepting, let requests in flight finish, cancel the rest.
"""

import asyncio
import contextlib
import email.utils
import functools
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote

import httptools

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
"""Request line and headers together; beyond, a 431 and the connection closes."""
IDLE_S = 75.0
"""A keep-alive connection with no request for this long is closed."""
_MAX_QUEUED = 16
"""Pipelined requests waiting on one connection before it stops reading."""

_REASONS = {status.value: status.phrase for status in HTTPStatus}


@dataclass
class Exchange:
    """What the access log says about one request; handlers fill it in."""

    request_id: str = "-"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None


class BodyTooLarge(Exception):
    """The request's body is over the server's limit (it was not kept)."""


@dataclass(eq=False)
class Response:
    """A whole response; ``streamed`` when a `Stream` has already sent it (or nothing more
    can be sent: the client went away)."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    streamed: bool = False


@dataclass(eq=False)
class Request:
    """One request, its body read whole."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    """Names in lower case; repeated headers joined by ', '."""
    body: bytes
    too_large: bool
    http_10: bool
    connection: "_Connection"
    params: dict[str, str] = field(default_factory=dict)
    """Path parameters of the matched route."""
    exchange: Exchange = field(default_factory=Exchange)

    def read(self) -> bytes:
        """The body (`BodyTooLarge` when it was over the limit)."""
        if self.too_large:
            raise BodyTooLarge
        return self.body

    def stream(self, content_type: str, headers: dict[str, str]) -> "Stream":
        """A 200 response whose body follows in pieces; the head leaves with the first."""
        return Stream(self, content_type, headers)


class Stream:
    """A streamed response body (chunked; close-delimited for HTTP/1.0 clients)."""

    def __init__(self, request: Request, content_type: str, headers: dict[str, str]) -> None:
        self._connection = request.connection
        self._chunked = not request.http_10
        if not self._chunked:
            request.connection.keep_alive = False
        self._head: bytes | None = request.connection.head(
            200, content_type, None if self._chunked else -1, headers
        )

    def _framed(self, data: bytes) -> bytes:
        framed = b"%x\r\n%b\r\n" % (len(data), data) if self._chunked and data else data
        if self._head is not None:
            framed, self._head = self._head + framed, None
        return framed

    async def write(self, data: bytes) -> None:
        """Send `data` (the head first, with it); waits while the client reads slowly."""
        self._connection.send(self._framed(data))
        await self._connection.drained()

    async def close(self, data: bytes = b"") -> Response:
        """Send `data` and end the body, in one write."""
        end = b"0\r\n\r\n" if self._chunked else b""
        self._connection.send(self._framed(data) + end)
        await self._connection.drained()
        return Response(streamed=True)


Handler = Callable[[Request], Awaitable[Response]]
"""Answers one request; never raises but for cancellation (the dispatcher's promise)."""
Refusal = Callable[[int, str], Response]
"""The response to a request the server itself refuses (status, message)."""


@dataclass(frozen=True)
class Route:
    handler: Handler
    endpoint: str
    """Its path pattern, as metrics name it."""
    param: str | None = None
    """For a prefix route: the name the rest of the path is given."""


class Router:
    """Exact paths, and prefixes whose rest is one parameter (``/v1/models/{model_id}``)."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Route]] = {}
        self._prefixes: list[tuple[str, dict[str, Route]]] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        """Route `method` on `path`; a path ending in ``{name}`` takes any non-empty rest."""
        if path.endswith("}"):
            prefix, _, name = path[:-1].rpartition("{")
            methods = next((m for p, m in self._prefixes if p == prefix), None)
            if methods is None:
                methods = {}
                self._prefixes.append((prefix, methods))
            methods[method] = Route(handler, path, name)
        else:
            self._exact.setdefault(path, {})[method] = Route(handler, path)

    def resolve(self, method: str, path: str) -> tuple[Route | None, dict[str, str], list[str]]:
        """The route for `method` on `path` with its parameters, or None with the methods the
        path allows (none: no such path)."""
        params: dict[str, str] = {}
        methods = self._exact.get(path)
        if methods is None:
            for prefix, candidates in self._prefixes:
                if path.startswith(prefix) and len(path) > len(prefix):
                    methods = candidates
                    name = next(iter(candidates.values())).param
                    assert name is not None
                    params = {name: path[len(prefix) :]}
                    break
        if methods is None:
            return None, {}, []
        route = methods.get("GET" if method == "HEAD" else method)
        if route is None:
            return None, {}, sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
        return route, params, []


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, answers them in order on one task."""

    def __init__(self, server: "HttpServer") -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._reading = True
        self.keep_alive = True
        """False once the connection is to close after the current response."""
        self.idle_since: float | None = time.monotonic()
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._head_bytes = 0
        self._header_list: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._too_large = False
        self._headers: dict[str, str] = {}

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._transport = None
        if self._task is not None:
            self._task.cancel()  # the client went away: its request is cancelled
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(ConnectionResetError("the client went away"))
            self._writable.exception()  # retrieved here, raised in drained()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported")
        except httptools.HttpParserError:
            self._refuse(400, "malformed HTTP request")
        except _Refused:
            pass

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.idle_since = None
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_list.append((name, value))
        self._grow_head(len(name) + len(value))

    def on_headers_complete(self) -> None:
        headers: dict[str, str] = {}
        for raw_name, raw_value in self._header_list:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self._headers = headers
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self._server.max_body_bytes:
            self._too_large = True
        elif headers.get("expect", "").lower() == "100-continue" and self._transport:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._too_large:
            return  # read and dropped: the answer is a 413
        self._size += len(body)
        if self._size > self._server.max_body_bytes:
            self._too_large = True
            self._body.clear()
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        url = httptools.parse_url(self._url)
        request = Request(
            method=self._parser.get_method().decode("ascii"),
            path=unquote(url.path.decode("latin-1")),
            query=(url.query or b"").decode("latin-1"),
            headers=self._headers,
            body=b"".join(self._body),
            too_large=self._too_large,
            http_10=self._parser.get_http_version() == "1.0",
            connection=self,
        )
        if not self._parser.should_keep_alive() or self._too_large:
            self.keep_alive = False
        self._reset()
        self._queue.append(request)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._answer())
        elif len(self._queue) >= _MAX_QUEUED and self._transport is not None:
            self._transport.pause_reading()
            self._reading = False

    # answering

    async def _answer(self) -> None:
        """Answer the queued requests in order; close when one asks to."""
        try:
            while self._queue and self._transport is not None:
                request = self._queue.popleft()
                if not self._reading and self._transport is not None:
                    self._transport.resume_reading()
                    self._reading = True
                response = await self._server.handle(request)
                if not response.streamed:
                    try:
                        self.send_whole(response, head_only=request.method == "HEAD")
                    except ConnectionError:  # the client left while it was being answered
                        return
                if not self.keep_alive or self._server.closing:
                    self.close()
                    return
        finally:
            self._task = None
            self.idle_since = time.monotonic()

    def head(
        self, status: int, content_type: str | None, length: int | None, headers: dict[str, str]
    ) -> bytes:
        """A response head; `length` None is chunked, -1 close-delimited."""
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
            f"Date: {_date()}",
            "Server: triptych",
        ]
        if content_type is not None:
            lines.append(f"Content-Type: {content_type}")
        if length is None:
            lines.append("Transfer-Encoding: chunked")
        elif length >= 0:
            lines.append(f"Content-Length: {length}")
        if not self.keep_alive or self._server.closing:
            lines.append("Connection: close")
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1")

    def send_whole(self, response: Response, head_only: bool = False) -> None:
        head = self.head(
            response.status, response.content_type, len(response.body), response.headers
        )
        self.send(head if head_only else head + response.body)

    def send(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("the client went away")
        self._transport.write(data)

    async def drained(self) -> None:
        """Until the client has taken what was written (flow control)."""
        if self._writable is not None:
            await self._writable

    def _grow_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(431, "the request line and headers are too large")
            raise _Refused

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request the parser could not take, then close."""
        self.keep_alive = False
        if self._transport is not None and self._task is None:
            with contextlib.suppress(ConnectionError):
                self.send_whole(self._server.refusal(status, message))
        self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    @property
    def busy(self) -> bool:
        return self._task is not None

    async def finish(self) -> None:
        """Until the request in hand has been answered."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class _Refused(Exception):
    """Ends parsing of a connection that was refused."""


@functools.lru_cache(maxsize=2)
def _http_date(second: int) -> str:
    return email.utils.formatdate(second, usegmt=True)


def _date() -> str:
    """The Date header's value (formatted once a second)."""
    return _http_date(int(time.time()))


@dataclass(eq=False)
class HttpServer:
    """Serves `handle` on one listening socket."""

    handle: Handler
    refusal: Refusal
    max_body_bytes: int
    connections: set[_Connection] = field(default_factory=set)
    closing: bool = False
    _server: asyncio.Server | None = None
    _sweeper: asyncio.Task[None] | None = None

    async def listen(
        self, host: str, port: int, backlog: int = 1024, reuse_port: bool = False
    ) -> int:
        """Bind `host`:`port` (0: any free port) and start serving; the port bound.
        `reuse_port`: other processes may bind it too (the kernel spreads connections)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            backlog=backlog,
            reuse_address=True,
            reuse_port=reuse_port or None,
        )
        self._sweeper = loop.create_task(self._sweep())
        return int(self._server.sockets[0].getsockname()[1])

    async def _sweep(self) -> None:
        """Close keep-alive connections idle for longer than `IDLE_S`."""
        while True:
            await asyncio.sleep(IDLE_S / 5)
            cutoff = time.monotonic() - IDLE_S
            for connection in list(self.connections):
                if connection.idle_since is not None and connection.idle_since < cutoff:
                    connection.close()

    async def close(self, grace_s: float) -> None:
        """Stop accepting; let requests in flight finish within `grace_s`, then cancel them."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            if not connection.busy:
                connection.close()
        busy = [c for c in self.connections if c.busy]
        if busy:
            log.info("draining %d HTTP requests for up to %gs", len(busy), grace_s)
            _, late = await asyncio.wait(
                [asyncio.ensure_future(c.finish()) for c in busy], timeout=grace_s
            )
            for connection in busy:
                connection.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()
