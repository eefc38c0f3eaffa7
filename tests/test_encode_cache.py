"""Encode once: content keys in the frontend, the encoder's embedding cache, affinity routing.

The same picture under two URLs and in two lossless formats costs one vision-tower forward;
different pictures never share an entry; the cache stays under its byte bound and never drops
an entry a request is reading; a repeated image goes to the same encoder of two, and keeps
being served when that encoder dies; answers with the cache on are transformers' own.
"""

import asyncio
import base64
import io
import random
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

from tests.stack import Stack, micro_stats, start_topology
from tests.test_correctness import IMAGE_CASES, Oracle, request, tokens_of
from tests.test_metrics import metrics_ports, scrape, value
from triptych.components.frontend.config import ImageLimits
from triptych.components.frontend.images import ImageLoader
from triptych.components.frontend.prompt import Preprocessor
from triptych.engines import CachedEncodeEngine, EmbeddingCache
from triptych.engines.hf.encode import HfEncodeEngine
from triptych.engines.mock import MockConfig, MockEncodeEngine
from triptych.models import load_adapter
from triptych.protocol import ChatCompletionRequest, ImageItem
from triptych.runtime.rendezvous import rendezvous_order
from triptych.transfer import ImageEmbeddings


def noisy(width: int, height: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height))
    image.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(width * height)])
    return image


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, fmt: str) -> str:
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode()


def chat(*urls: str, text: str = "What is this?", max_tokens: int = 4) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {
        "model": "tiny-qwen2.5-vl",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
    }


# content keys


async def _keys(tiny_model: Path, root: Path, *urls: str) -> list[str]:
    loader = ImageLoader(ImageLimits(file_root=str(root)))
    try:
        preprocessor = Preprocessor(str(tiny_model), loader)
        prompt = await preprocessor.prompt(ChatCompletionRequest.model_validate(chat(*urls)))
        return [image.content_key for image in prompt.images]
    finally:
        await loader.close()


def test_content_key_names_the_pixels_not_the_url_or_format(
    tiny_model: Path, tmp_path: Path
) -> None:
    picture = noisy(64, 48, 1)
    png, bmp = encoded(picture, "PNG"), encoded(picture, "BMP")
    webp = io.BytesIO()
    picture.save(webp, format="WEBP", lossless=True)
    (tmp_path / "same.webp").write_bytes(webp.getvalue())
    other = noisy(64, 48, 2)
    one_pixel = picture.copy()
    one_pixel.putpixel((5, 5), (0, 0, 0) if picture.getpixel((5, 5)) != (0, 0, 0) else (1, 1, 1))
    keys = asyncio.run(
        _keys(
            tiny_model,
            tmp_path,
            data_url(png, "PNG"),
            data_url(bmp, "BMP"),
            f"file://{tmp_path}/same.webp",
            data_url(encoded(other, "PNG"), "PNG"),
            data_url(encoded(one_pixel, "PNG"), "PNG"),
            data_url(encoded(picture.resize((128, 96)), "PNG"), "PNG"),
        )
    )
    assert keys[0] == keys[1] == keys[2]
    assert len(keys[0]) == 64  # BLAKE2b-256, hex
    assert len(set(keys[2:])) == 4  # another picture, one pixel off, another size: all differ


# the cache, on a real vision tower


def _items(tiny_model: Path, pictures: list[Image.Image]) -> list[ImageItem]:
    adapter = load_adapter(str(tiny_model))
    assert adapter is not None
    items, offset = [], 0
    for index, picture in enumerate(pictures):
        layout = adapter.image_layout(picture.height, picture.width)
        items.append(
            ImageItem(
                width=picture.width,
                height=picture.height,
                grid_thw=layout.grid_thw,
                num_tokens=layout.num_tokens,
                offset=offset,
                data=encoded(picture, "PNG"),
                content_key=f"key-{index}",
            )
        )
        offset += layout.num_tokens + 3
    return items


def _keyed(item: ImageItem, key: str, offset: int) -> ImageItem:
    return item.model_copy(update={"content_key": key, "offset": offset})


def test_cached_rows_equal_the_forward_and_repeats_skip_it(tiny_model: Path) -> None:
    pictures = [noisy(56, 56, 3), noisy(84, 56, 4)]

    async def run() -> None:
        plain = HfEncodeEngine(str(tiny_model))
        cached = CachedEncodeEngine(HfEncodeEngine(str(tiny_model)), 1 << 30)
        await plain.start()
        await cached.start()
        try:
            a, b = _items(tiny_model, pictures)
            truth = await plain.encode("t", [a, b])
            first = await cached.encode("r1", [a, b])
            forwards: list[int] = []
            inner = cached.inner
            assert isinstance(inner, HfEncodeEngine)
            original = inner.encode

            async def counting(rid: str, images: Any, videos: Any = ()) -> ImageEmbeddings:
                forwards.append(len(images))
                return await original(rid, images, videos)

            inner.encode = counting  # type: ignore[method-assign]
            # b first this time, a twice: rows follow the prompt order, a is embedded once
            b2 = _keyed(b, b.content_key, 0)
            a2 = _keyed(a, a.content_key, b.num_tokens + 1)
            a3 = _keyed(a, a.content_key, b.num_tokens + a.num_tokens + 2)
            again = await cached.encode("r2", [b2, a2, a3])
            assert forwards == []
            assert torch.equal(first.tensor, truth.tensor)
            rows_a, rows_b = truth.tensor[: a.num_tokens], truth.tensor[a.num_tokens :]
            assert torch.equal(again.tensor, torch.cat([rows_b, rows_a, rows_a]))
            assert len(cached.cache) == 2
        finally:
            await plain.close()
            await cached.close()

    asyncio.run(run())


def _mock_item(key: str, offset: int, tokens: int = 16) -> ImageItem:
    return ImageItem(
        width=56,
        height=56,
        grid_thw=(1, 8, 8),
        num_tokens=tokens,
        offset=offset,
        data=b"x",
        content_key=key,
    )


def _rows(tokens: int) -> ImageEmbeddings:
    return ImageEmbeddings(tokens, 4, torch.arange(tokens * 4, dtype=torch.float32).view(tokens, 4))


def test_eviction_keeps_the_cache_under_its_byte_bound() -> None:
    entry = 16 * 4 * 4  # 16 rows of 4 float32
    cache = EmbeddingCache(3 * entry)
    for key in "abc":
        held = cache.put(key, _rows(16))
        assert held is not None
        cache.unpin(held)
    assert cache.bytes == 3 * entry
    hit = cache.pin("a")  # a becomes the most recent: b is the oldest now
    assert hit is not None
    cache.unpin(hit)
    held = cache.put("d", _rows(16))
    assert held is not None
    cache.unpin(held)
    assert cache.bytes == 3 * entry
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "acd" if k in cache}
    assert cache.put("huge", _rows(64)) is None  # larger than the whole bound: not cached
    assert cache.bytes <= cache.capacity_bytes


def test_an_entry_being_read_is_not_evicted_under_its_reader() -> None:
    """A request hits `a` and misses `b` and `d`; while they are in the vision tower, another
    entry wants the room (bound: one entry). `a` stays until its reader is done. (The tower runs
    one forward at a time, as a model thread does, so the competing entry is put directly.)"""

    async def run() -> None:
        rows = 16
        encoder = CachedEncodeEngine(
            MockEncodeEngine(MockConfig(encode_s_per_image=0.2, hidden_size=4)), rows * 4 * 2
        )
        await encoder.encode("warm", [_mock_item("a", 0)])
        assert "a" in encoder.cache
        reader = asyncio.create_task(
            encoder.encode("reader", [_mock_item("a", 0), _mock_item("b", 20), _mock_item("d", 40)])
        )
        await asyncio.sleep(0.05)
        entry = encoder.cache._entries["a"]
        assert entry.pins == 1  # the reader holds it across the forward of b and d
        # c is the size of a: it would fit were a free, not beside it
        assert entry.nbytes <= encoder.cache.capacity_bytes < 2 * entry.nbytes
        other = ImageEmbeddings(num_tokens=rows, hidden_size=4)  # as the mock's rows are
        assert encoder.cache.put("c", other) is None  # no space: a is pinned
        assert not reader.done()
        assert "a" in encoder.cache and "c" not in encoder.cache
        result = await reader
        assert result.num_tokens == 3 * rows
        assert entry.pins == 0
        assert encoder.cache.bytes <= encoder.cache.capacity_bytes
        await encoder.encode("later", [_mock_item("c", 0)])  # a is free now: evicted for c
        assert "c" in encoder.cache and "a" not in encoder.cache

    asyncio.run(run())


def test_rendezvous_moves_only_the_keys_that_must() -> None:
    keys = [f"image-{i}" for i in range(400)]
    three = ["enc-a", "enc-b", "enc-c"]
    before = {k: rendezvous_order([k], three)[0] for k in keys}
    after = {k: rendezvous_order([k], three[:2])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "enc-c" for k in moved)
    assert 0.2 < sum(1 for k in keys if before[k] == "enc-a") / len(keys) < 0.45
    grown = {k: rendezvous_order([k], [*three, "enc-d"])[0] for k in keys}
    assert all(grown[k] in (before[k], "enc-d") for k in keys)


# end to end, mock engine


def _encode_metrics(stack: Stack) -> list[dict[Any, float]]:
    ports = asyncio.run(metrics_ports(stack, "encode"))
    return [scrape(f"http://127.0.0.1:{port}/metrics") for port in ports]


def _total(samples: list[dict[Any, float]], name: str) -> float:
    return sum(value(s, name) for s in samples)


def test_same_picture_two_urls_two_formats_is_one_forward(stack: Stack, tmp_path: Path) -> None:
    start_topology(stack, "E/P/D", frontend_args=("--allowed-local-media-path", str(tmp_path)))
    picture = noisy(56, 56, 7)
    png, bmp = encoded(picture, "PNG"), encoded(picture, "BMP")
    (tmp_path / "picture.png").write_bytes(png)
    urls = [data_url(png, "PNG"), data_url(bmp, "BMP"), f"file://{tmp_path}/picture.png"]
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        for url in urls:
            reply = client.post("/v1/chat/completions", json=chat(url))
            assert reply.status_code == 200, reply.text
        samples = _encode_metrics(stack)
        assert _total(samples, "triptych_encode_batch_size_count") == 1  # one forward
        assert _total(samples, "triptych_encode_cache_misses_total") == 1
        assert _total(samples, "triptych_encode_cache_hits_total") == 2
        assert _total(samples, "triptych_encode_cache_bytes") > 0

        other = data_url(encoded(noisy(56, 56, 8), "PNG"), "PNG")
        reply = client.post("/v1/chat/completions", json=chat(other))
        assert reply.status_code == 200, reply.text
        samples = _encode_metrics(stack)
        assert _total(samples, "triptych_encode_batch_size_count") == 2  # a second forward
        assert _total(samples, "triptych_encode_batch_size_sum") == 2
        assert _total(samples, "triptych_encode_cache_misses_total") == 2


def test_cache_off_encodes_every_time(stack: Stack) -> None:
    start_topology(stack, "E/P/D", "--embedding-cache-bytes", "0")
    url = data_url(encoded(noisy(56, 56, 9), "PNG"), "PNG")
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        for _ in range(3):
            assert client.post("/v1/chat/completions", json=chat(url)).status_code == 200
    samples = _encode_metrics(stack)
    assert _total(samples, "triptych_encode_batch_size_count") == 3
    assert _total(samples, "triptych_encode_cache_hits_total") == 0


def test_affinity_sends_a_repeated_image_to_one_encoder_and_survives_its_death(
    stack: Stack,
) -> None:
    start_topology(stack, "E/P/D")
    stack.start("encode", "encode_worker", "--engine", "mock")
    url = data_url(encoded(noisy(56, 56, 10), "PNG"), "PNG")

    async def encoders() -> dict[str, int]:
        return {i: int(s["requests"]) for i, s in (await micro_stats(stack, "encode")).items()}

    with httpx.Client(base_url=stack.url, timeout=60) as client:
        for _ in range(300):
            if len(asyncio.run(encoders())) == 2:
                break
        assert len(asyncio.run(encoders())) == 2
        time.sleep(2.5)  # the frontend's discovery has seen both
        for _ in range(6):
            assert client.post("/v1/chat/completions", json=chat(url)).status_code == 200
        counts = asyncio.run(encoders())
        assert sorted(counts.values()) == [0, 6], counts
        samples = _encode_metrics(stack)
        assert _total(samples, "triptych_encode_batch_size_count") == 1
        assert _total(samples, "triptych_encode_cache_hits_total") == 5

        chosen = next(i for i, n in counts.items() if n == 6)
        victim = next(p for p in stack.processes if p.name == "encode" and chosen in p.output())
        victim.kill()
        for _ in range(4):
            reply = client.post("/v1/chat/completions", json=chat(url))
            assert reply.status_code == 200, reply.text
        survivors = asyncio.run(encoders())
        assert chosen not in survivors and sum(survivors.values()) >= 4


# token-exact with the cache on (hf engine)


def test_answers_are_token_exact_with_the_cache_on(stack: Stack, tiny_model: Path) -> None:
    start_topology(stack, "E/P/D", engine="hf", model_path=str(tiny_model), ready_timeout=300)
    oracle = Oracle(tiny_model)
    cases = IMAGE_CASES  # they repeat pictures across cases; each case is asked twice

    async def ask() -> None:
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:
            for messages in cases:
                expected = oracle.tokens(messages)
                for _ in range(2):
                    got = await tokens_of(client, "tiny-qwen2.5-vl", request(messages))
                    assert got == expected

    asyncio.run(ask())
    samples = _encode_metrics(stack)
    assert _total(samples, "triptych_encode_cache_hits_total") >= 5
    misses = _total(samples, "triptych_encode_cache_misses_total")
    assert misses == 4  # ONE and the three of THREE, each through the tower once
    assert _total(samples, "triptych_encode_batch_size_sum") == misses


def test_affinity_falls_back_to_the_next_encoder_when_the_first_is_loaded(stack: Stack) -> None:
    """Encoders announce a bound of 2; at --affinity-max-load 0.5 the frontend holds one call
    open on the preferred encoder, so a second concurrent request for the same image goes to
    the next encoder in hash order, and a later one comes back to the first."""
    bound = ("--max-running-requests", "1", "--max-queued-requests", "1")
    start_topology(
        stack,
        "E/P/D",
        "--mock-decode-s-per-step",
        "0.05",
        *bound,
        frontend_args=("--affinity-max-load", "0.5"),
    )
    stack.start("encode", "encode_worker", "--engine", "mock", *bound)
    url = data_url(encoded(noisy(56, 56, 11), "PNG"), "PNG")

    async def encoders() -> dict[str, int]:
        return {i: int(s["requests"]) for i, s in (await micro_stats(stack, "encode")).items()}

    for _ in range(300):
        if len(asyncio.run(encoders())) == 2:
            break
    time.sleep(2.5)  # the frontend's discovery has seen both

    async def two_at_once() -> None:
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
            first = asyncio.create_task(
                client.post("/v1/chat/completions", json=chat(url, max_tokens=100))
            )
            # the first holds its call open while it decodes (5 s): once an encoder took it
            # (however slow a loaded machine is to get there), the second comes
            while sum((await encoders()).values()) < 1:
                assert not first.done(), first.result()
            second = await client.post("/v1/chat/completions", json=chat(url, max_tokens=2))
            assert second.status_code == 200 and (await first).status_code == 200

    asyncio.run(two_at_once())
    assert sorted(asyncio.run(encoders()).values()) == [1, 1]
