"""Image input: every way an image can be bad ends at the frontend with a 400 naming the
problem, no worker sees the request, and the stack keeps serving."""

import asyncio
import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.stack import Stack, free_port, start_topology
from tests.test_scale_out import requests_per_instance
from triptych.runtime.nats_server import NatsServer


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


@pytest.fixture(scope="module")
def images_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    (root / "ok.png").write_bytes(png(56, 56))
    return root


@pytest.fixture(scope="module")
def guarded(
    nats_server: NatsServer,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
    images_root: Path,
) -> Iterator[Stack]:
    stack = Stack(nats_server.url, tmp_path_factory.mktemp("guarded"))
    limits = (
        "--max-images",
        "3",
        "--max-image-bytes",
        "200000",
        "--max-image-pixels",
        "1000000",
        "--image-fetch-timeout-s",
        "2",
        "--allowed-local-media-path",
        str(images_root),
    )
    try:
        yield start_topology(stack, "E/P/D", frontend_args=limits)
    finally:
        stack.stop()


def served_requests(stack: Stack) -> int:
    return sum(asyncio.run(requests_per_instance(stack, "encode")).values())


BAD: list[tuple[str, Any, str]] = [
    ("not an image", chat(data_url(b"hello, not a picture")), "could not be decoded"),
    ("truncated", chat(data_url(png(64, 64)[:60])), "could not be decoded"),
    ("bad base64", chat("data:image/png;base64,@@@@"), "not valid base64"),
    ("too many", chat(*[data_url(png(28, 28))] * 4), "too many images"),
    ("too many pixels", chat(data_url(png(1100, 1000))), "pixels"),
    ("unsupported scheme", chat("ftp://example.invalid/cat.png"), "unsupported image URL scheme"),
    ("unreachable", chat(f"http://127.0.0.1:{free_port()}/cat.png"), "could not be fetched"),
    ("outside the root", chat("file:///etc/passwd"), "outside the allowed directory"),
    ("context", chat(data_url(png(56, 56)), max_tokens=10**6), "context length"),
]


@pytest.mark.parametrize(("name", "body", "mentions"), BAD, ids=[b[0] for b in BAD])
def test_bad_image_is_a_400_and_reaches_no_worker(
    guarded: Stack, name: str, body: Any, mentions: str
) -> None:
    before = served_requests(guarded)
    reply = httpx.post(f"{guarded.url}/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 400, reply.text
    assert mentions in reply.json()["error"]["message"]
    assert served_requests(guarded) == before


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


def test_good_images_still_served_afterwards(guarded: Stack, images_root: Path) -> None:
    body = chat(data_url(png(84, 56)), (images_root / "ok.png").as_uri())
    reply = httpx.post(f"{guarded.url}/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    assert httpx.get(f"{guarded.url}/ready", timeout=5).status_code == 200
