"""`Runtime`: one process's seat on the control plane (one NATS connection)."""

import asyncio
import contextlib
import itertools
import logging
import secrets
import ssl
import time
from typing import Any

from nats.aio.client import Client as NatsConnection

from triptych.protocol import ErrorCode, ErrorInfo
from triptych.runtime import wire
from triptych.runtime.client import Client
from triptych.runtime.config import RuntimeConfig
from triptych.runtime.links import (
    CallerLink,
    CallHandler,
    LinkDialer,
    LinkServer,
    Publish,
    frame_headers,
)
from triptych.runtime.stream import ResponseStream

log = logging.getLogger(__name__)


class Runtime:
    """Owns the NATS connection, the process's response-stream inbox, and cancellation.

    Use as an async context manager, or call `start` and `close` (both safe to call twice).
    """

    def __init__(self, config: RuntimeConfig, name: str = "triptych") -> None:
        self.config = config
        self.name = name
        self.nc: NatsConnection = NatsConnection()
        self._streams: dict[str, ResponseStream] = {}
        self._stream_ids = itertools.count()
        self._prefix = ""
        self._clients: list[Client] = []
        self._started = False
        self._closing = False
        self._refused = asyncio.Event()
        self.lost = asyncio.Event()
        """Set when NATS stayed unreachable for `config.reconnect_window_s`: the process
        should exit non-zero and let its supervisor restart it."""
        self._outage: asyncio.TimerHandle | None = None
        self.links: LinkDialer | None = None
        """Direct stream links this process opened to the instances it calls."""
        self._link_server: LinkServer | None = None

    async def start(self) -> None:
        """Connect to NATS (reconnecting forever afterwards) and open the stream inbox."""
        if self._started:
            return
        self._started = True
        await self._connect()
        self._prefix = wire.stream_prefix(self.config.namespace, secrets.token_hex(8))
        await self.nc.subscribe(f"{self._prefix}.*", cb=self._on_frame)
        if self.config.direct_streams:
            self.links = LinkDialer(self._prefix, self._on_link_frame, self._on_link_lost)
        log.info("%s joined NATS at %s", self.name, _public(self.nc.connected_url))

    async def _connect(self) -> None:
        # nats-py retries an authorization violation forever; fail start-up on it instead.
        self._refused = asyncio.Event()
        connecting = asyncio.ensure_future(self.nc.connect(**self._connect_options()))
        refused = asyncio.ensure_future(self._refused.wait())
        try:
            await asyncio.wait({connecting, refused}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            refused.cancel()
        if not connecting.done():
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.nc.close()
            raise PermissionError(
                f"NATS at {self.config.nats_url.split('@')[-1]} refused "
                "this process's credentials (authorization violation)"
            )
        connecting.result()

    async def close(self) -> None:
        """Stop clients and drain the connection. Safe to call twice."""
        self._closing = True
        if self._outage is not None:
            self._outage.cancel()
        for client in self._clients:
            await client.close()
        self._clients.clear()
        if self.links is not None:
            await self.links.close()
        if self._link_server is not None:
            await self._link_server.close()
        for stream in list(self._streams.values()):
            stream.close()
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # NATS unreachable: close without draining
                with contextlib.suppress(Exception):
                    await self.nc.close()

    async def __aenter__(self) -> "Runtime":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def client(self, component: str, endpoint: str = "generate") -> Client:
        """A started client for `component`'s `endpoint`, owned by this runtime."""
        client = Client(self, component, endpoint)
        await client.start()
        self._clients.append(client)
        return client

    async def cancel(self, request_id: str) -> None:
        """Tell every worker to drop `request_id` and free what it holds."""
        await self.nc.publish(wire.cancel_subject(self.config.namespace), request_id.encode())

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Publish one frame (used by stream sinks)."""
        await self.nc.publish(subject, data, headers=headers)

    async def serve_links(self, host: str, advertised: str | None = None) -> int | None:
        """Offer direct links on `host` (the caller dials the `advertised` address, and a
        caller on this host its UNIX socket); returns the port, or None when direct links
        are off."""
        if not self.config.direct_streams:
            return None
        if self._link_server is None:
            self._link_server = LinkServer()
        return await self._link_server.start(host, advertised=advertised)

    @property
    def link_key(self) -> str:
        """The secret callers show to use this process's direct links ("" without links)."""
        return self._link_server.key if self._link_server is not None else ""

    def serve_calls(self, subject: str, handler: CallHandler) -> None:
        """Serve the calls for endpoint `subject` that arrive on direct links (no-op without)."""
        if self._link_server is not None:
            self._link_server.serve(subject, handler)

    def stop_serving_calls(self, subject: str) -> None:
        """Refuse further calls for `subject` on direct links, as a stopped NATS endpoint."""
        if self._link_server is not None:
            self._link_server.stop_serving(subject)

    def publisher(self, subject: str) -> Publish:
        """How this process sends the frames of the stream on `subject`: over the owner's
        direct link when it has one here, else through NATS."""
        if self._link_server is not None:
            direct = self._link_server.publisher(subject)
            if direct is not None:
                return direct
        return self.publish

    def open_stream(self, request_id: str, deadline: float) -> ResponseStream:
        """A new response stream whose frames arrive on a subject of this process."""
        subject = f"{self._prefix}.{next(self._stream_ids)}"
        stream = ResponseStream(
            subject, request_id, deadline, self.config.stream_idle_timeout_s, self._forget_stream
        )
        self._streams[subject] = stream
        return stream

    def _forget_stream(self, stream: ResponseStream) -> None:
        self._streams.pop(stream.subject, None)

    async def _on_frame(self, msg: Any) -> None:
        stream = self._streams.get(msg.subject)
        if stream is not None:
            stream.feed(msg.data, msg.headers)

    def _on_link_frame(self, subject: str, kind: int, data: bytes, link: CallerLink) -> None:
        stream = self._streams.get(subject)
        if stream is not None:
            stream.link = link
            stream.feed(data, frame_headers(kind))

    def _on_link_lost(self, link: CallerLink) -> None:
        for stream in list(self._streams.values()):
            if stream.link is link:
                error = ErrorInfo(
                    code=ErrorCode.UNAVAILABLE,
                    message=f"{stream.instance or 'the worker'}'s stream link was lost",
                    request_id=stream.request_id,
                )
                stream.feed(error.model_dump_json().encode(), {wire.ERROR_CODE: "503"})

    def _connect_options(self) -> dict[str, Any]:
        cfg = self.config
        options: dict[str, Any] = {
            "servers": [url.strip() for url in cfg.nats_url.split(",")],
            "name": self.name,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "connect_timeout": 5,
            "allow_reconnect": True,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if cfg.nats_user:
            options["user"] = cfg.nats_user
            options["password"] = cfg.nats_password or ""
        if cfg.nats_token:
            options["token"] = cfg.nats_token
        if cfg.nats_tls_ca:
            options["tls"] = ssl.create_default_context(cafile=cfg.nats_tls_ca)
        return options

    async def _on_error(self, error: Exception) -> None:
        if "authorization violation" in str(error).lower() and not self.nc.is_connected:
            self._refused.set()
        log.warning("NATS: %s", error)

    async def _on_disconnected(self) -> None:
        if self._closing:
            return
        window = self.config.reconnect_window_s
        log.warning("%s lost NATS; reconnecting (for up to %gs)", self.name, window)
        if self._outage is None:
            self._outage = asyncio.get_running_loop().call_later(window, self._give_up)

    async def _on_reconnected(self) -> None:
        if self._outage is not None:
            self._outage.cancel()
            self._outage = None
        log.info("%s reconnected to NATS at %.3f", self.name, time.time())

    def _give_up(self) -> None:
        log.error(
            "%s could not reach NATS for %gs; exiting for a supervisor to restart it",
            self.name,
            self.config.reconnect_window_s,
        )
        self.lost.set()


def _public(url: Any) -> str:
    """host:port of a NATS URL, never its credentials."""
    if url is None:
        return "?"
    return f"{url.hostname}:{url.port}"
