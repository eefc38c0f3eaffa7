"""Prefix reuse: a prompt's cached prefix (text, images by content key) is not computed again.

Engine-level tests run the `hf` core on the tiny checkpoint and check every answer against
transformers' greedy ``generate()`` (text) or against the same prompt computed whole with the
cache off (images: the whole-prompt path is the one the correctness tests check against
transformers); block keys and the block manager are checked directly.
"""

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from prometheus_client import REGISTRY

from tests.stack import Stack, micro_stats, start_topology
from tests.test_correctness import Oracle, request
from tests.test_encode_cache import data_url, encoded, noisy
from tests.test_hf_decode import generate, hand_off, started_cores
from tests.test_metrics import metrics_ports, scrape, value
from triptych.engines.hf.block_manager import BlockManager
from triptych.engines.hf.config import HfConfig
from triptych.engines.hf.core import EngineCore
from triptych.engines.hf.model import LanguageModel
from triptych.engines.hf.sequence import Prompt
from triptych.models.prefix import ROUTE_TOKENS, MediaSpan, block_keys, route_keys
from triptych.protocol import GenerateRequest, ImageItem, SamplingOptions
from triptych.runtime import RuntimeConfig
from triptych.runtime.client import Client

PAGE = 4


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> LanguageModel:
    return LanguageModel(str(tiny_model))


@pytest.fixture
def cores(model: LanguageModel) -> Iterator[Callable[..., EngineCore]]:
    """``cores(stage, decoding=True, **config)``: started cores, closed after the test."""
    defaults = {"max_len": 256, "max_running": 4, "kv_tokens": 4 * 256, "page_size": PAGE}
    with started_cores(model, **defaults) as make:
        yield make


def counter(name: str, stage: str) -> float:
    return REGISTRY.get_sample_value(name, {"stage": stage}) or 0.0


def hits(stage: str) -> float:
    return counter("triptych_prefix_cache_hit_tokens_total", stage)


def queried(stage: str) -> float:
    return counter("triptych_prefix_cache_queried_tokens_total", stage)


def computed(stage: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "triptych_engine_tokens_total", {"stage": stage, "phase": "prefill"}
        )
        or 0.0
    )


async def run(
    core: EngineCore, prompt: Prompt, steps: int, spans: list[MediaSpan] | None = None
) -> list[int]:
    """Greedy tokens of `prompt` on a decoding core, its blocks keyed when the cache is on."""
    sampling = SamplingOptions(max_tokens=steps, temperature=0, ignore_eos=True)
    keys = None
    if core.runner.config.prefix_cache:
        keys = block_keys(prompt.token_ids, spans or [], core.runner.config.page_size)
    tokens: list[int] = []
    async with core.admission("r", len(prompt.token_ids), keys) as sequence:
        async for chunk in core.generate(sequence, sampling, set(), prompt):
            tokens.extend(chunk.token_ids)
    return tokens


# block keys


def test_block_keys_follow_tokens_and_images_by_content_not_by_placeholder() -> None:
    tokens = [1, 2, 3, 4, *[9] * 8, 5, 6, 7, 8, 10]  # an image's 8 placeholders at 4..11
    a = block_keys(tokens, [MediaSpan(4, 12, "picture-a")], PAGE)
    again = block_keys(tokens, [MediaSpan(4, 12, "picture-a")], PAGE)
    b = block_keys(tokens, [MediaSpan(4, 12, "picture-b")], PAGE)
    assert len(a) == 4 and a == again  # full blocks only: the 17th token is not keyed
    assert a[0] == b[0]  # the text before the image
    assert all(x != y for x, y in zip(a[1:], b[1:], strict=True))  # from the image on
    assert block_keys(tokens, [MediaSpan(4, 12, "")], PAGE) == a[:1]  # keyless: stop there
    other_text = block_keys([1, 2, 3, 5, *tokens[4:]], [MediaSpan(4, 12, "picture-a")], PAGE)
    assert all(x != y for x, y in zip(a, other_text, strict=True))  # chained


def test_route_keys_are_the_prompt_beginning() -> None:
    def request(tokens: list[int], key: str | None = None) -> GenerateRequest:
        images = []
        if key is not None:
            grid = (1, 2, 4)
            images = [
                ImageItem(width=8, height=8, grid_thw=grid, num_tokens=2, offset=2, content_key=key)
            ]
        return GenerateRequest(
            model="m", token_ids=tokens, images=images, sampling=SamplingOptions(max_tokens=1)
        )

    head = list(range(ROUTE_TOKENS))
    assert route_keys(request([*head, 1, 2])) == route_keys(request([*head, 3]))
    assert route_keys(request([*head, 1])) != route_keys(request([7, *head[1:], 1]))
    assert route_keys(request(head, "a")) == route_keys(request(head, "a"))
    assert route_keys(request(head, "a")) != route_keys(request(head, "b"))
    assert route_keys(request(head, "")) == []  # an image without a key: no affinity
    assert route_keys(request([1, 2, 3])) == route_keys(request([1, 2, 3]))


# the block manager


def test_a_shared_block_is_never_handed_out_while_a_sequence_holds_it() -> None:
    blocks = BlockManager(num_blocks=7, block_size=PAGE)  # 6 usable
    first: list[int] = []
    blocks.allocate(first, 3 * PAGE)
    blocks.register(first, [b"k0", b"k1", b"k2"], 2)  # the third is not full yet
    second: list[int] = []
    shared = blocks.match([b"k0", b"k1", b"k2"])
    assert shared == first[:2]
    blocks.share(second, shared)
    blocks.allocate(second, 3 * PAGE)
    assert [blocks.refs(b) for b in first] == [2, 2, 1]
    blocks.release(first)
    assert [blocks.refs(b) for b in shared] == [1, 1] and blocks.free == 6 - 3
    grab: list[int] = []
    blocks.allocate(grab, blocks.free * PAGE)
    assert not set(grab) & set(second)  # the held ones never come back while held
    with pytest.raises(ValueError):
        blocks.allocate(grab, (len(grab) + 1) * PAGE)
    blocks.release(grab)
    blocks.release(second)
    assert blocks.free == 6 and blocks.cached == 2  # unheld, still cached
    assert blocks.match([b"k0", b"k1"]) == shared


def test_cached_blocks_are_reclaimed_least_recently_used_first() -> None:
    blocks = BlockManager(num_blocks=5, block_size=PAGE)  # 4 usable
    old: list[int] = []
    blocks.allocate(old, 2 * PAGE)
    blocks.register(old, [b"old0", b"old1"], 2)
    old_blocks = list(old)
    blocks.release(old)
    new: list[int] = []
    blocks.allocate(new, 2 * PAGE)
    blocks.register(new, [b"new0", b"new1"], 2)
    blocks.release(new)
    taken: list[int] = []
    blocks.allocate(taken, 1 * PAGE)  # nothing plain is free: the oldest cached goes
    assert taken == [old_blocks[1]]  # a prompt's last block goes before its first
    assert blocks.match([b"old0", b"old1"]) == old_blocks[:1]
    assert len(blocks.match([b"new0", b"new1"])) == 2


# the aggregated (decoding) core


async def test_a_repeated_prompt_and_a_shared_prefix_are_computed_once(
    cores: Any, model: LanguageModel
) -> None:
    core = cores("prefix-agg")
    prompt = list(range(30, 60))  # 30 tokens: 7 full blocks of 4
    first = await run(core, Prompt(prompt), 8)
    assert first == generate(model, prompt, 8)
    assert hits("prefix-agg") == 0 and queried("prefix-agg") == 30
    before = computed("prefix-agg")
    assert await run(core, Prompt(prompt), 8) == first
    assert hits("prefix-agg") == 28  # every full block
    assert computed("prefix-agg") - before == 2

    aligned = list(range(70, 102))  # 32 tokens: 8 full blocks, the last one stays to compute
    assert await run(core, Prompt(aligned), 3) == generate(model, aligned, 3)
    assert await run(core, Prompt(aligned), 3) == generate(model, aligned, 3)
    assert hits("prefix-agg") == 28 + 28

    other = [*prompt[:22], 900, 901, 902, 903, 904, 905, 906, 907]  # shares 5 blocks
    assert await run(core, Prompt(other), 8) == generate(model, other, 8)
    assert hits("prefix-agg") == 28 + 28 + 20
    assert core.runner.blocks is not None and core.runner.blocks.used == 0


async def test_the_cache_off_computes_everything(cores: Any, model: LanguageModel) -> None:
    core = cores("prefix-off", prefix_cache=False)
    prompt = list(range(30, 60))
    for _ in range(2):
        assert await run(core, Prompt(prompt), 5) == generate(model, prompt, 5)
    assert queried("prefix-off") == hits("prefix-off") == 0
    assert computed("prefix-off") == 60


def image_prompt(model: LanguageModel, seed: int) -> tuple[Prompt, int]:
    """Text, one image of 16 placeholders (grid 1x8x8, merge 2) with made-up embeddings,
    text; and where the image starts."""
    assert model.image_token_id is not None
    start = 9
    tokens = [*range(300, 300 + start), *[model.image_token_id] * 16, *range(400, 411)]
    embeddings = torch.randn(16, model.hidden_size, generator=torch.Generator().manual_seed(seed))
    return Prompt(tokens, [(1, 8, 8)], embeddings), start


async def test_images_are_reused_by_content_key_and_never_past_a_different_one(
    cores: Any, model: LanguageModel
) -> None:
    core = cores("prefix-img")
    whole = cores("prefix-img-off", prefix_cache=False)
    picture, start = image_prompt(model, seed=1)
    other, _ = image_prompt(model, seed=2)  # same tokens, another picture
    span_a, span_b = [MediaSpan(start, start + 16, "a")], [MediaSpan(start, start + 16, "b")]
    expected_a = await run(whole, picture, 6)
    expected_b = await run(whole, other, 6)
    assert expected_a != expected_b  # the picture matters to the answer

    assert await run(core, picture, 6, span_a) == expected_a
    assert await run(core, other, 6, span_b) == expected_b
    assert hits("prefix-img") == 8  # the two blocks wholly before the image, no further
    assert await run(core, picture, 6, span_a) == expected_a  # same picture (any URL)
    assert hits("prefix-img") == 8 + 32  # all 8 full blocks, past the image
    assert await run(core, other, 6, span_b) == expected_b
    assert hits("prefix-img") == 8 + 32 + 32


async def test_eviction_under_block_pressure_keeps_answers_exact(
    cores: Any, model: LanguageModel
) -> None:
    # 16 blocks of 4: one 30-token prompt and its growth takes 9; a second one evicts the first
    core = cores("prefix-evict", max_len=64, max_running=2, kv_tokens=64)
    blocks = core.runner.blocks
    assert blocks is not None
    a, b = list(range(10, 40)), list(range(500, 530))
    assert await run(core, Prompt(a), 8) == generate(model, a, 8)
    assert blocks.cached == 7
    assert await run(core, Prompt(b), 8) == generate(model, b, 8)
    assert await run(core, Prompt(a), 8) == generate(model, a, 8)
    assert hits("prefix-evict") < 28  # some of a's blocks had to go for b
    assert blocks.used == 0 and blocks.cached <= blocks.capacity


# the prefill-only core (prefill workers)


async def test_a_prefill_worker_computes_only_the_suffix_and_sends_the_whole_cache(
    cores: Any, model: LanguageModel
) -> None:
    prefill = cores("prefix-prefill", decoding=False)
    decode = cores("prefix-decode", prefix_cache=False)
    shared = list(range(100, 124))
    prompts = [[*shared, 1, 2, 3, 4, 5], [*shared, 6, 7, 8, 9, 10, 11]]
    reused = []
    for prompt in prompts:
        keys = block_keys(prompt, [], PAGE)
        tokens, cached = await hand_off(prefill, decode, model, prompt, 6, keys)
        reused.append(cached)
        assert tokens == generate(model, prompt, 6)
    assert reused == [0, 24]
    assert hits("prefix-prefill") == 24  # the second prompt reused the shared 6 blocks
    assert computed("prefix-prefill") == 29 + 30 - 24
    assert prefill.runner.blocks is not None and prefill.runner.blocks.used == 0


async def test_a_prefill_worker_without_space_for_a_prefix_cache_computes_prompts_whole(
    cores: Any, model: LanguageModel, caplog: pytest.LogCaptureFixture
) -> None:
    prefill = cores("prefix-no-space", decoding=False, kv_tokens=PAGE)  # under one sequence
    assert "no space for a prefix cache" in caplog.text
    assert prefill.runner.blocks is None and not prefill.runner.config.prefix_cache
    prompt = list(range(100, 130))
    for _ in range(2):
        packed, _, _ = await prefill.prefill_only("r", Prompt(prompt), block_keys(prompt, [], PAGE))
        assert packed.numel() > 0
    assert computed("prefix-no-space") == 60 and queried("prefix-no-space") == 0


# the stack: routing by prefix, and the cache behind the API


def test_requests_sharing_a_prefix_go_to_the_same_prefill_instance(stack: Stack) -> None:
    start_topology(stack, "P/D")
    stack.start("prefill", "prefill_worker", "--engine", "mock")
    system = "You answer questions about the sea, the weather and boats. " * 8  # > 64 tokens

    async def prefills() -> dict[str, int]:
        return {i: int(s["requests"]) for i, s in (await micro_stats(stack, "prefill")).items()}

    for _ in range(300):
        if len(asyncio.run(prefills())) == 2:
            break
    time.sleep(2.5)  # the decode worker's discovery has seen both
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        for question in ("Why?", "How deep is it?", "Is it cold?", "Where?", "Who?", "When?"):
            body = {
                "model": "tiny-qwen2.5-vl",
                "max_tokens": 2,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
            }
            reply = client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
    assert sorted(asyncio.run(prefills()).values()) == [0, 6]


@pytest.mark.parametrize(
    ("topology", "copies", "component", "stage"),
    [("EPD", 2, "decode", "agg"), ("E/P/D", 1, "prefill", "prefill")],
)
def test_a_repeated_image_prompt_meets_its_cached_prefix_and_answers_exactly(
    stack: Stack, tiny_model: Path, topology: str, copies: int, component: str, stage: str
) -> None:
    """hf workers: the same picture under two URLs (PNG, BMP) lands on the worker that cached
    the prompt (EPD: one of two) and reuses it past the image; another picture reuses nothing
    past the text before it; the usage says how many prompt tokens were cached; every answer
    is transformers' own."""
    start_topology(stack, topology, copies=copies, engine="hf", model_path=str(tiny_model))
    picture, other = noisy(56, 56, 21), noisy(56, 56, 22)
    png = data_url(encoded(picture, "PNG"), "PNG")
    bmp = data_url(encoded(picture, "BMP"), "BMP")
    other_png = data_url(encoded(other, "PNG"), "PNG")
    oracle = Oracle(tiny_model)

    def messages(url: str) -> list[dict[str, Any]]:
        parts = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What?"},
        ]
        return [{"role": "user", "content": parts}]

    def hit_tokens() -> float:
        ports = asyncio.run(metrics_ports(stack, component))
        samples = [scrape(f"http://127.0.0.1:{port}/metrics") for port in ports]
        return sum(value(s, "triptych_prefix_cache_hit_tokens_total", stage=stage) for s in samples)

    async def ask(url: str) -> tuple[list[int], int, int]:
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:
            reply = await client.post(
                "/v1/chat/completions", json={**request(messages(url)), "model": "tiny-qwen2.5-vl"}
            )
            assert reply.status_code == 200, reply.text
            body = reply.json()
            usage = body["usage"]
            cached = int(usage["prompt_tokens_details"]["cached_tokens"])
            return list(body["choices"][0]["token_ids"]), int(usage["prompt_tokens"]), cached

    expected = oracle.tokens(messages(png))
    tokens, prompt_tokens, cached = asyncio.run(ask(png))
    assert tokens == expected and hit_tokens() == cached == 0
    whole = (prompt_tokens - 1) // 16 * 16  # every full block, the image's included
    tokens, _, cached = asyncio.run(ask(bmp))
    assert tokens == expected
    assert hit_tokens() == cached == whole
    tokens, _, cached = asyncio.run(ask(other_png))
    assert tokens == oracle.tokens(messages(other_png))
    assert hit_tokens() - whole == cached <= 16  # at most the text before the picture


async def test_affinity_passes_over_an_instance_that_announces_a_long_queue() -> None:
    """A prefill call's stream ends once the room is known, so the caller's own open calls
    say nothing of prefill's load: the queue each instance announces does."""
    runtime = SimpleNamespace(nc=None, config=RuntimeConfig(), links=None)
    client = Client(runtime, "prefill", "generate")  # type: ignore[arg-type]
    keys = ["prefix:abc"]

    async def announce(instance: str, queued: int) -> None:
        metadata = {"max_in_flight": "8", "load_queue_depth": str(queued)}
        pong = json.dumps({"id": instance, "metadata": metadata}).encode()
        await client.instances._on_pong(SimpleNamespace(data=pong))

    for instance in ("p1", "p2"):
        await announce(instance, 0)
    preferred, other = client._by_affinity(keys, ["p1", "p2"])
    await announce(preferred, 3)  # under half of its bound
    assert client._by_affinity(keys, ["p1", "p2"]) == [preferred, other]
    await announce(preferred, 4)  # half of its bound: the next in hash order goes first
    assert client._by_affinity(keys, ["p1", "p2"]) == [other, preferred]


def test_the_flag_reaches_both_engines() -> None:
    from triptych.engines.registry import EngineConfig
    from triptych.engines.sglang.server_args import server_args_kwargs

    parser = argparse.ArgumentParser()
    EngineConfig.add_arguments(parser)
    default = EngineConfig.from_args(parser.parse_args([]), "model")
    off = EngineConfig.from_args(parser.parse_args(["--disable-prefix-cache"]), "model")
    assert default.prefix_cache and not off.prefix_cache
    ports = {"encoder_bootstrap_port": 1}
    assert server_args_kwargs(off, "agg", **ports)["disable_radix_cache"] is True
    assert server_args_kwargs(default, "agg", **ports)["disable_radix_cache"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_on_cuda_cached_prefixes_answer_as_the_cache_off_does(tiny_model: Path) -> None:
    """On CUDA, prompts queued together share one batched prefill, and a prompt whose prefix
    is cached runs only its suffix: concurrent requests, some with a cached prefix and some
    with an image, answer exactly as a core with the cache off answers them."""
    model = LanguageModel(str(tiny_model), device="cuda")
    settings = {"max_len": 256, "max_running": 8, "kv_tokens": 8 * 256, "page_size": PAGE}
    cached = EngineCore(model, HfConfig(**settings), True, "prefix-cuda")
    whole = EngineCore(model, HfConfig(**settings, prefix_cache=False), True, "prefix-cuda-off")
    cached.start()
    whole.start()
    try:
        shared = list(range(200, 236))
        texts = [[*shared, *range(i, i + 5 + i % 3)] for i in (600, 610, 620, 630)]
        picture, start = image_prompt(model, seed=3)
        spans = [MediaSpan(start, start + 16, "p")]
        expected = [await run(whole, Prompt(t), 6) for t in texts]
        expected.append(await run(whole, picture, 6))
        assert await run(cached, Prompt(texts[0]), 6) == expected[0]  # caches the prefix
        assert await run(cached, picture, 6, spans) == expected[-1]  # and the picture's
        for _ in range(2):  # then all at once: cached prefixes beside a batched prefill
            answers = await asyncio.gather(
                *(run(cached, Prompt(t), 6) for t in texts), run(cached, picture, 6, spans)
            )
            assert list(answers) == expected
        assert hits("prefix-cuda") >= 2 * (4 * 36 + 32)
        assert cached.runner.blocks is not None and cached.runner.blocks.used == 0
    finally:
        cached.close()
        whole.close()
