"""A local web server for media tests (a thread running its own event loop), and the check that
a refused request reached no worker."""

import asyncio
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx
from aiohttp import web

from tests.stack import Stack
from tests.test_scale_out import requests_per_instance

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class MediaServer:
    """Serves `routes` (path → handler) on a free loopback port, plus ``/to-private``: a redirect
    to `private_path` on 127.0.0.1, which the frontend's address guard must refuse."""

    def __init__(self, routes: Mapping[str, Handler], private_path: str) -> None:
        self.port = 0  # bound by the server thread, known once `_ready` is set
        self._routes = routes
        self._private_path = private_path
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()

        async def to_private(_: web.Request) -> web.Response:
            raise web.HTTPFound(f"http://127.0.0.1:{self.port}{self._private_path}")

        for path, handler in self._routes.items():
            app.router.add_get(path, handler)
        app.router.add_get("/to-private", to_private)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        self.port = int(runner.addresses[0][1])
        self._ready.set()
        self._loop.run_forever()

    def url(self, path: str, host: str = "localhost") -> str:
        return f"http://{host}:{self.port}{path}"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


def encoded_requests(stack: Stack) -> int:
    """Requests the stack's encoders have served so far."""
    return sum(asyncio.run(requests_per_instance(stack, "encode")).values())


def assert_refused_at_the_frontend(stack: Stack, body: dict[str, Any], mentions: str) -> None:
    """`body` is a 400 whose message says `mentions`, and no encoder saw it."""
    before = encoded_requests(stack)
    reply = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 400, reply.text
    assert mentions in reply.json()["error"]["message"]
    assert encoded_requests(stack) == before
