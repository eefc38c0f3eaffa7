"""Response streams: the caller's end (`ResponseStream`) and the worker's end (`StreamSink`)."""

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel

from triptych.protocol import ErrorCode, ErrorInfo
from triptych.runtime import wire
from triptych.runtime.errors import ServiceError, deadline_exceeded, unavailable

M = TypeVar("M", bound=BaseModel)
Publish = Callable[[str, bytes, dict[str, str] | None], Awaitable[None]]

_DONE = object()


class ResponseStream:
    """Frames of one call, in order: iterate for payloads; errors are raised as `ServiceError`.

    The stream ends at the end marker. It fails when the call's deadline passes or when the
    holder of the stream stays silent (no data, no keepalive) for `idle_timeout` seconds.

    Both limits are kept by one timer per stream (the watchdog), armed when the reader first
    waits and re-armed only when it fires, rather than by a timeout around every wait, which
    a stream of tokens would arm and cancel once per token.
    """

    def __init__(
        self,
        subject: str,
        request_id: str,
        deadline: float,
        idle_timeout: float,
        on_close: Callable[["ResponseStream"], None],
    ) -> None:
        self.subject = subject
        self.request_id = request_id
        self.deadline = deadline
        self._idle_timeout = idle_timeout
        self._on_close = on_close
        self._frames: deque[tuple[bytes, dict[str, str] | None]] = deque()
        """Arrived frames the reader has not taken (keepalives are only heard, not kept)."""
        self._heard = 0.0
        """When (monotonic) the stream was last heard from, or its reader began its wait."""
        self._waiter: asyncio.Future[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._finished = False
        self.instance = ""
        """The instance that accepted the call."""
        self.link: object | None = None
        """The direct link its frames arrive on, once one did (None: NATS)."""

    def feed(self, data: bytes, headers: dict[str, str] | None) -> None:
        """Called by the runtime for each frame that arrives on this stream's subject."""
        self._heard = time.monotonic()
        if headers is not None and wire.KEEPALIVE in headers:
            return
        self._frames.append((data, headers))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def pending(self) -> bool:
        """Whether a frame has arrived that the reader has not taken yet (so a reader that
        batches its writes knows more is coming without waiting). A closed stream has none:
        nobody will read what it still holds."""
        return bool(self._frames) and not self._finished

    def close(self) -> None:
        """Stop receiving. Safe to call twice."""
        if not self._finished:
            self._finished = True
            if self._waiter is None and self._watchdog is not None:
                self._watchdog.cancel()  # a reader still waiting keeps its limits
                self._watchdog = None
            self._on_close(self)

    @property
    def finished(self) -> bool:
        """True once the end marker or an error arrived, or the stream was closed."""
        return self._finished

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while not self._finished:
            data, headers = await self._next_frame()
            if headers is None:
                return data
            if wire.ERROR_CODE in headers:
                self.close()
                raise self._error(data, headers)
            if wire.END in headers:
                self.close()
                if data:
                    return data
        raise StopAsyncIteration

    async def next_model(self, model: type[M]) -> M:
        """The next payload parsed as `model`; a stream that ends instead is an error."""
        async for data in self:
            return model.model_validate_json(data)
        raise unavailable("stream ended before a response arrived", self.request_id)

    async def _next_frame(self) -> tuple[bytes, dict[str, str] | None]:
        while True:
            if time.time() >= self.deadline:
                self.close()
                raise deadline_exceeded(self.request_id)
            if self._frames:
                return self._frames.popleft()
            await self._wait()

    async def _wait(self) -> None:
        """Until a frame arrives or the deadline passes; raises when the stream stays silent
        for the idle timeout meanwhile."""
        loop = asyncio.get_running_loop()
        self._heard = time.monotonic()
        while not self._frames and time.time() < self.deadline:
            silent = time.monotonic() - self._heard
            if silent >= self._idle_timeout:
                self.close()
                raise unavailable(
                    f"worker went silent for {self._idle_timeout:g}s", self.request_id
                )
            waiter = self._waiter = loop.create_future()
            if self._watchdog is None:
                wait = min(self.deadline - time.time(), self._idle_timeout - silent)
                self._watchdog = loop.call_later(max(0.0, wait), self._bark)
            try:
                await waiter
            finally:
                self._waiter = None

    def _bark(self) -> None:
        """The watchdog's timer: wake the reader to check its limits (it re-arms on waiting)."""
        self._watchdog = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _error(self, data: bytes, headers: dict[str, str]) -> ServiceError:
        try:
            return ServiceError.from_info(ErrorInfo.model_validate_json(data))
        except ValueError:
            code = int(headers.get(wire.ERROR_CODE, ErrorCode.INTERNAL) or ErrorCode.INTERNAL)
            return ServiceError(code, headers.get(wire.ERROR, "remote error"), self.request_id)


class StreamSink:
    """The worker's end of a response stream: send payloads, then end it or fail it once."""

    def __init__(self, publish: Publish, subject: str, request_id: str) -> None:
        self._publish = publish
        self.subject = subject
        self.request_id = request_id
        self.closed = not subject
        self.last_sent = time.monotonic()

    async def send(self, message: BaseModel, *, end: bool = False) -> None:
        """Send one payload; `end` makes it the last frame."""
        await self.send_bytes(message.__pydantic_serializer__.to_json(message), end=end)

    async def send_bytes(self, data: bytes, *, end: bool = False) -> None:
        """Send one payload already encoded (e.g. a token chunk by its own codec)."""
        if self.closed:
            return
        self.closed = end
        self.last_sent = time.monotonic()
        await self._publish(self.subject, data, wire.END_HEADERS if end else None)

    async def end(self) -> None:
        """Send the end marker alone."""
        await self.send_bytes(b"", end=True)

    async def fail(self, error: ErrorInfo) -> None:
        """Send an error frame; it ends the stream."""
        if self.closed:
            return
        self.closed = True
        headers = {wire.ERROR_CODE: str(error.code), wire.ERROR: error.message}
        await self._publish(self.subject, error.model_dump_json().encode(), headers)

    async def keepalive(self) -> None:
        """Prove the stream's holder is alive."""
        if not self.closed:
            self.last_sent = time.monotonic()
            await self._publish(self.subject, b"", wire.KEEPALIVE_HEADERS)

    def hand_off(self) -> None:
        """Another worker now holds the stream; this one must not write to it again."""
        self.closed = True
