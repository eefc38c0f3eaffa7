"""Image input: every way an image can be bad ends at the frontend with a 400 naming the
problem, no worker sees the request, and the stack keeps serving."""

import asyncio
import base64
import io
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from PIL import Image

from tests.media_server import (
    Handler,
    MediaServer,
    assert_refused_at_the_frontend,
)
from tests.stack import Stack
from triptych.components.frontend.address_guard import AddressGuard, BlockedAddress


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (9, 99, 199)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def chat(*urls: str, max_tokens: int = 4) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    parts.append({"type": "text", "text": "describe"})
    return {
        "model": "tiny-qwen2.5-vl",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": parts}],
    }


MEDIA_LIMITS = {
    "--max-images": 3,
    "--max-image-bytes": 200000,
    "--max-image-pixels": 1000000,
    "--image-fetch-timeout-s": 2,
    "--max-body-bytes": 2000000,
}
"""The frontend's limits under test (flag: value), read by the `guarded` fixture."""


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    (root / "ok.png").write_bytes(png(56, 56))
    return root


def image_server_routes() -> dict[str, Handler]:
    """Good and bad image resources."""
    ok = png(56, 56)

    async def image(_: web.Request) -> web.Response:
        return web.Response(body=ok, content_type="image/png")

    async def page(_: web.Request) -> web.Response:
        return web.Response(text="<html>not a picture</html>", content_type="text/html")

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response(body=ok, content_type="image/png")

    async def loop(_: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    return {"/ok.png": image, "/page": page, "/slow": slow, "/loop": loop}


@pytest.fixture(scope="module")
def image_server() -> Iterator[MediaServer]:
    server = MediaServer(image_server_routes(), "/ok.png")
    yield server
    server.stop()


def bomb() -> bytes:
    """Tiny on disk, 400 megapixels when decoded."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


def _refusing_port() -> int:
    """A loopback port that refuses connections and that nobody else can take: bound, held
    open for the whole module, never listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    return int(sock.getsockname()[1])


_HELD: list[socket.socket] = []

BAD: list[tuple[str, Any, str]] = [
    ("not an image", data_url(b"hello, not a picture"), "could not be decoded"),
    ("truncated", data_url(png(64, 64)[:60]), "could not be decoded"),
    ("bad base64", "data:image/png;base64,@@@@", "not valid base64"),
    ("too many", [data_url(png(28, 28))] * 4, "too many images"),
    ("too many pixels", data_url(png(1100, 1000)), "pixels"),
    ("decompression bomb", data_url(bomb()), "too large to decode"),
    ("unsupported scheme", "ftp://example.invalid/cat.png", "unsupported image URL scheme"),
    ("unreachable", f"http://localhost:{_refusing_port()}/cat.png", "could not be fetched"),
    ("outside the root", "file:///etc/passwd", "outside the allowed directory"),
    ("path traversal", "file://{root}/../../etc/passwd", "outside the allowed directory"),
    ("not an image resource", "/page", "could not be decoded"),
    ("stalls", "/slow", "took over 2s"),
    ("redirect loop", "/loop", "redirects too many times"),
    ("redirect to a private address", "/to-private", "refused"),
    ("loopback address", "http://127.0.0.1:{port}/ok.png", "refused"),
    ("IPv6 loopback", "http://[::1]:{port}/ok.png", "refused"),
    ("cloud metadata", "http://169.254.169.254/latest/meta-data/", "refused"),
    ("private network", "http://10.11.12.13/cat.png", "refused"),
    ("context", "CONTEXT", "context length"),
]


def case_body(url: Any, server: MediaServer, root: Path) -> dict[str, Any]:
    if url == "CONTEXT":
        return chat(data_url(png(56, 56)), max_tokens=10**6)
    urls = url if isinstance(url, list) else [url]
    urls = [
        server.url(u) if u.startswith("/") else u.format(port=server.port, root=root) for u in urls
    ]
    return chat(*urls)


@pytest.mark.parametrize(("name", "url", "mentions"), BAD, ids=[b[0] for b in BAD])
def test_bad_image_is_a_400_and_reaches_no_worker(
    guarded: Stack,
    image_server: MediaServer,
    media_root: Path,
    name: str,
    url: Any,
    mentions: str,
) -> None:
    assert_refused_at_the_frontend(guarded, case_body(url, image_server, media_root), mentions)


def test_too_large_image_bytes(guarded: Stack) -> None:
    big = Image.frombytes("RGB", (400, 400), bytes(range(256)) * 1875)
    buffer = io.BytesIO()
    big.save(buffer, format="BMP")  # uncompressed: 480 KB, over the 200 KB limit
    reply = httpx.post(
        f"{guarded.url}/v1/chat/completions",
        json=chat(data_url(buffer.getvalue(), "bmp")),
        timeout=30,
    )
    assert reply.status_code == 400
    assert "bytes" in reply.json()["error"]["message"]


def test_request_body_over_the_limit_is_a_413(guarded: Stack) -> None:
    reply = httpx.post(
        f"{guarded.url}/v1/chat/completions", json=chat(data_url(b"x" * 1_600_000)), timeout=30
    )
    assert reply.status_code == 413
    assert reply.json()["error"]["message"] == "request body is over 2000000 bytes"


def test_allow_listed_networks_pass_the_guard() -> None:
    guard = AddressGuard(allowed_networks=("10.0.0.0/8",))
    guard.check_address("inside", "10.1.2.3")
    with pytest.raises(BlockedAddress):
        guard.check_address("elsewhere", "192.168.1.1")
    with pytest.raises(BlockedAddress):
        guard.check_address("mapped", "::ffff:127.0.0.1")
    guard.check_address("public", "93.184.216.34")


def test_good_images_still_served_afterwards(
    guarded: Stack, media_root: Path, image_server: MediaServer
) -> None:
    body = chat(
        data_url(png(84, 56)), (media_root / "ok.png").as_uri(), image_server.url("/ok.png")
    )
    reply = httpx.post(f"{guarded.url}/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    assert httpx.get(f"{guarded.url}/ready", timeout=5).status_code == 200
