"""A 3 MB image and a 1.5 MB video through a NATS server with the stock 1 MB ``max_payload``:
the bytes move from the frontend to the encoder by NIXL, and the answer is still transformers'
own."""

import asyncio
import io
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from PIL import Image

from tests.stack import Stack, serving
from tests.test_correctness import Oracle, image_part, request, tokens_of
from tests.test_video_correctness import VideoOracle
from tests.videos import clip, video_part
from triptych.runtime.nats_server import NatsServer

STOCK_MAX_PAYLOAD = 1024 * 1024


def large_png(width: int, height: int, seed: int) -> bytes:
    """Noise compresses badly: about 3 bytes per pixel as PNG."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stock_nats() -> Iterator[NatsServer]:
    """A nats-server whose configuration does not raise the message limit."""
    with NatsServer() as server:
        yield server


@pytest.fixture(scope="module")
def served(
    stock_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[Stack]:
    with serving(
        stock_nats.url,
        tmp_path_factory.mktemp("large"),
        "E/P/D",
        engine="hf",
        model_path=str(tiny_model),
        ready_timeout=180,
    ) as stack:
        yield stack


async def server_max_payload(url: str) -> int:
    nc = await nats.connect(url)
    try:
        return int(nc.max_payload)
    finally:
        await nc.close()


async def media_bytes_read(stack: Stack, component: str, kind: str = "image") -> float:
    """What `component` has read over NIXL as image (or video) bytes (its /metrics, found via
    NATS)."""
    nc = await nats.connect(stack.nats_url)
    inbox = nc.new_inbox()
    infos: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        infos.append(json.loads(msg.data))

    sub = await nc.subscribe(inbox, cb=collect)
    await nc.publish(f"$SRV.INFO.{stack.namespace}-{component}", b"", reply=inbox)
    await asyncio.sleep(0.3)
    await sub.unsubscribe()
    await nc.close()
    total = 0.0
    async with httpx.AsyncClient(timeout=10) as client:
        for info in infos:
            meta = info["metadata"]
            text = (await client.get(f"http://{meta['host']}:{meta['metrics_port']}/metrics")).text
            for line in text.splitlines():
                if line.startswith(f'triptych_transfer_bytes_total{{kind="{kind}",outcome="ok"}}'):
                    total += float(line.split()[-1])
    return total


def test_a_3_mb_image_passes_a_stock_1_mb_nats(served: Stack, tiny_model: Path) -> None:
    assert asyncio.run(server_max_payload(served.nats_url)) == STOCK_MAX_PAYLOAD
    picture = large_png(1000, 1000, seed=int.from_bytes(os.urandom(2), "little"))
    assert len(picture) > 3_000_000
    messages = [{"role": "user", "content": [image_part(picture), {"type": "text", "text": "?"}]}]

    async def ask() -> list[int]:
        async with httpx.AsyncClient(base_url=served.url, timeout=300) as client:
            return await tokens_of(client, tiny_model.name, request(messages))

    assert asyncio.run(ask()) == Oracle(tiny_model).tokens(messages)
    assert asyncio.run(media_bytes_read(served, "encode")) >= len(picture)


def test_a_video_over_1_mb_passes_a_stock_1_mb_nats(served: Stack, tiny_model: Path) -> None:
    """3 s of 320x240 noise at 30 fps: 6 frames sampled, 3 temporal patches."""
    video = clip(320, 240, frames=90, fps=30, seed=int.from_bytes(os.urandom(2), "little"))
    assert len(video) > STOCK_MAX_PAYLOAD
    messages = [{"role": "user", "content": [video_part(video), {"type": "text", "text": "?"}]}]
    before = asyncio.run(media_bytes_read(served, "encode", "video"))

    async def ask() -> list[int]:
        async with httpx.AsyncClient(base_url=served.url, timeout=300) as client:
            return await tokens_of(client, tiny_model.name, request(messages))

    assert asyncio.run(ask()) == VideoOracle(tiny_model).tokens(messages)
    assert asyncio.run(media_bytes_read(served, "encode", "video")) - before == len(video)
