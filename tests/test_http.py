"""The frontend's HTTP/1.1 server on real sockets: keep-alive, pipelining, bodies and their
limit, streamed responses, clients that go away, and the drain on close."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from triptych.components.frontend.http import HttpServer, Request, Response, Router
from triptych.components.frontend.middleware import dispatcher, refusal

LIMIT = 1000


class App:
    """A few endpoints that show what the server does with them; those with no body or
    parameter are GETs at ``/`` and their name."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()
        router = Router()
        router.add("POST", "/echo", self.echo)
        router.add("GET", "/items/{name}", self.item)
        for endpoint in (self.stream, self.hang, self.slow, self.boom, self.gone):
            router.add("GET", f"/{endpoint.__name__}", endpoint)
        self.handle = dispatcher(router, api_key=None, access_log=False)

    async def echo(self, request: Request) -> Response:
        return Response(body=request.read(), content_type="application/octet-stream")

    async def item(self, request: Request) -> Response:
        return Response(body=request.params["name"].encode(), content_type="text/plain")

    async def stream(self, request: Request) -> Response:
        stream = request.stream("text/event-stream", {"X-Test": "1"})
        for i in range(3):
            await stream.write(b"data: %d\n\n" % i)
        return await stream.close(b"data: [DONE]\n\n")

    async def hang(self, request: Request) -> Response:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return Response()

    async def slow(self, request: Request) -> Response:
        await self.release.wait()
        return Response(body=b"finished", content_type="text/plain")

    async def boom(self, request: Request) -> Response:
        raise RuntimeError("a bug")

    async def gone(self, request: Request) -> Response:
        stream = request.stream("text/event-stream", {})
        await stream.write(b"data: 0\n\n")
        request.connection.close()  # as if the client had hung up between two writes
        return await stream.close(b"data: [DONE]\n\n")


def client_of(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}")


@contextlib.asynccontextmanager
async def serving(app: App) -> AsyncIterator[tuple[HttpServer, int]]:
    server = HttpServer(app.handle, refusal, LIMIT)
    port = await server.listen("127.0.0.1", 0)
    try:
        yield server, port
    finally:
        await server.close(5)


async def pieces(*parts: bytes) -> AsyncIterator[bytes]:
    """A body of unknown length (sent chunked)."""
    for part in parts:
        yield part


async def exchange(port: int, data: bytes, until: bytes = b"", timeout: float = 5) -> bytes:
    """Send raw bytes; read until `until` is in the reply (or the server closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    received = b""
    try:
        async with asyncio.timeout(timeout):
            while not until or until not in received:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                received += chunk
    finally:
        writer.close()
    return received


async def test_keep_alive_and_path_parameters() -> None:
    app = App()
    async with serving(app) as (_, port), client_of(port) as client:
        for body in (b"one", b"two" * 100):
            reply = await client.post("/echo", content=body)
            assert reply.status_code == 200 and reply.content == body
        reply = await client.get("/items/a%20b")
        assert reply.text == "a b"
        assert reply.headers["server"] == "triptych" and "date" in reply.headers


async def test_pipelined_requests_are_answered_in_order() -> None:
    app = App()
    request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b"
    data = b"".join(request % (len(b), b) for b in (b"first", b"second", b"third"))
    async with serving(app) as (_, port):
        reply = await exchange(port, data, until=b"third")
    assert reply.count(b"HTTP/1.1 200 OK") == 3
    assert reply.index(b"first") < reply.index(b"second") < reply.index(b"third")


async def test_chunked_bodies_and_expect_100_continue() -> None:
    app = App()
    chunked = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Expect: 100-continue\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    async with serving(app) as (_, port):
        reply = await exchange(port, chunked, until=b"hello world")
    assert reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")


async def test_a_body_over_the_limit_is_refused_and_the_connection_closes() -> None:
    app = App()
    async with serving(app) as (_, port), client_of(port) as client:
        reply = await client.post("/echo", content=b"x" * (LIMIT + 1))
        assert reply.status_code == 413
        assert reply.headers["connection"] == "close"
        reply = await client.post("/echo", content=pieces(b"x" * 600, b"x" * 600))
        assert reply.status_code == 413


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"y" * 70_000 + b"\r\n\r\n", 431),
    ],
    ids=["malformed", "huge head"],
)
async def test_requests_the_parser_refuses_get_a_json_error(data: bytes, status: int) -> None:
    async with serving(App()) as (_, port):
        reply = await exchange(port, data)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status)
    assert b'"error"' in body and b"Connection: close" in head


async def test_unknown_paths_methods_and_bugs_are_json_errors() -> None:
    async with serving(App()) as (_, port), client_of(port) as client:
        missing = await client.get("/nothing")
        assert missing.status_code == 404 and "/nothing" in missing.json()["error"]["message"]
        wrong = await client.delete("/stream")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD"
        bug = await client.get("/boom")
        assert bug.status_code == 500
        assert bug.json()["error"]["message"] == "internal error (RuntimeError)"
        head = await client.head("/items/x")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == "1"


async def test_streams_are_chunked_and_close_delimited_for_http_10() -> None:
    async with serving(App()) as (_, port):
        async with client_of(port) as client:
            reply = await client.get("/stream")
            assert reply.headers["transfer-encoding"] == "chunked"
            assert reply.headers["x-test"] == "1"
            assert reply.text == "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
        old = await exchange(port, b"GET /stream HTTP/1.0\r\n\r\n")
    head, _, body = old.partition(b"\r\n\r\n")
    assert b"chunked" not in head and b"Connection: close" in head
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"


async def test_a_client_that_goes_away_cancels_its_request() -> None:
    app = App()
    async with serving(app) as (server, port):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        async with asyncio.timeout(5):
            await app.cancelled.wait()
        await asyncio.sleep(0.2)
        assert not server.connections


async def test_close_lets_requests_in_flight_finish_and_refuses_new_ones() -> None:
    app = App()
    server = HttpServer(app.handle, refusal, LIMIT)
    port = await server.listen("127.0.0.1", 0)
    async with client_of(port) as client:
        slow = asyncio.ensure_future(client.get("/slow"))
        await asyncio.sleep(0.2)
        closing = asyncio.ensure_future(server.close(10))
        await asyncio.sleep(0.2)
        with pytest.raises(httpx.ConnectError):
            await httpx.AsyncClient().get(f"http://127.0.0.1:{port}/items/x")
        app.release.set()
        reply = await slow
        assert reply.text == "finished" and reply.headers["connection"] == "close"
        await closing


async def test_a_write_to_a_client_that_left_is_no_error(caplog: pytest.LogCaptureFixture) -> None:
    async with serving(App()) as (server, port):
        reply = await exchange(port, b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.1)
        assert not server.connections
    assert reply.startswith(b"HTTP/1.1 200 OK") and b"data: 0" in reply
    assert b"[DONE]" not in reply
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
