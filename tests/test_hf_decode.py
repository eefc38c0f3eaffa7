"""The hf engine's language-model side on the tiny checkpoint: paged attention, the decode step,
and the engine core (admission by blocks, chunked prefill, preemption, the KV hand-off), each
checked against transformers' own ``generate()``."""

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from prometheus_client import REGISTRY

from triptych.engines.hf import kv_transfer
from triptych.engines.hf.config import HfConfig
from triptych.engines.hf.core import EngineCore
from triptych.engines.hf.decoder import Decoder, StepInputs
from triptych.engines.hf.kv_cache import KVBudget, KVCache, KVLayer
from triptych.engines.hf.model import LanguageModel
from triptych.engines.hf.paged_attention import (
    PageTable,
    paged_attention,
    reference_paged_attention,
)
from triptych.engines.hf.sequence import Prompt
from triptych.protocol import ErrorCode, SamplingOptions, ServiceError

PROMPTS = [[5, 6, 7], list(range(20, 60)), [900, 901, 902, 903, 904, 905, 906], [7, 8], [40] * 10]
STEPS = [12, 4, 9, 7, 10]


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> LanguageModel:
    return LanguageModel(str(tiny_model))


def generate(model: LanguageModel, prompt: list[int], steps: int) -> list[int]:
    """transformers' greedy tokens: the oracle."""
    with torch.inference_mode():
        out = model.model.generate(
            torch.tensor([prompt], device=model.device),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
        )
    return [int(t) for t in out[0, len(prompt) :]]


def paged(
    lengths: list[int],
    heads: int,
    kv_heads: int,
    dim: int,
    page: int,
    dtype: torch.dtype,
    device: str,
) -> tuple[torch.Tensor, ...]:
    """A random paged cache with scattered block tables, and a query per row."""
    g = torch.Generator().manual_seed(sum(lengths))
    tables_width = max(-(-n // page) for n in lengths)
    blocks = 1 + sum(-(-n // page) for n in lengths) + 3
    keys = torch.randn(blocks, page, kv_heads, dim, generator=g).to(device, dtype)
    values = torch.randn(blocks, page, kv_heads, dim, generator=g).to(device, dtype)
    order = torch.randperm(blocks - 1, generator=g) + 1
    tables = torch.zeros(len(lengths), tables_width, dtype=torch.int32)
    used = 0
    for row, n in enumerate(lengths):
        count = -(-n // page)
        tables[row, :count] = order[used : used + count]
        used += count
    query = torch.randn(len(lengths), heads, dim, generator=g).to(device, dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    return query, keys, values, tables.to(device), lens.to(device)


def per_row_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Each row on its own: gather its positions in order, repeat the KV heads, plain SDPA."""
    page, kv_heads = keys.shape[1], keys.shape[2]
    out = []
    for row in range(query.shape[0]):
        n = int(lens[row])
        slots = [int(tables[row, p // page]) * page + p % page for p in range(n)]
        k = keys.reshape(-1, kv_heads, keys.shape[-1])[slots].transpose(0, 1)
        v = values.reshape(-1, kv_heads, keys.shape[-1])[slots].transpose(0, 1)
        group = query.shape[1] // kv_heads
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        q = query[row].unsqueeze(1)
        out.append(
            F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)[:, 0]
        )
    return torch.stack(out)


def test_paged_attention_equals_each_row_attending_alone() -> None:
    lengths = [1, 5, 16, 17, 70, 33]
    q, k, v, tables, lens = paged(
        lengths, heads=8, kv_heads=2, dim=16, page=4, dtype=torch.float32, device="cpu"
    )
    got = paged_attention(q, KVLayer(k, v), PageTable(tables, lens), scale=0.25)
    want = per_row_attention(q, k, v, tables, lens, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("splits", [1, 4, 32])
def test_the_triton_kernel_equals_the_reference(dtype: torch.dtype, splits: int) -> None:
    lengths = [1, 15, 16, 17, 300, 513, 64, 2]
    q, k, v, tables, lens = paged(
        lengths, heads=28, kv_heads=4, dim=128, page=16, dtype=dtype, device="cuda"
    )
    pages = PageTable(tables, lens)
    got = paged_attention(q, KVLayer(k, v), pages, scale=128**-0.5, splits=splits)
    want = reference_paged_attention(
        q.float(), KVLayer(k.float(), v.float()), pages, scale=128**-0.5
    )
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance)


def decoder_for(model: LanguageModel, fused: bool, graphs: bool = False) -> tuple[Decoder, KVCache]:
    cache = KVCache(model.kv_shape, num_blocks=256, block_size=4, device=model.device)
    decoder = Decoder(
        model, cache, max_batch=6, sequence_rows=6, max_blocks=96, cuda_graphs=graphs, fused=fused
    )
    return decoder, cache


def run_steps(
    decoder: Decoder, cache: KVCache, prompts: list[list[int]], steps: int
) -> list[torch.Tensor]:
    """Prefill each prompt into scattered blocks, then decode greedily; each step's logits."""
    model = decoder.model
    tables, lengths, tokens = [], [], []
    next_block = 1
    for row, prompt in enumerate(prompts):
        state = model.prepare(Prompt(prompt))
        kv_cache, hidden = model.prefill_chunk(state, len(prompt))
        count = -(-(len(prompt) + steps) // cache.block_size)
        table = list(range(next_block + count - 1, next_block - 1, -1))  # backwards: scattered
        next_block += count
        cache.write(
            cache.slots(table, 0, len(prompt)),
            kv_transfer.unpack(
                model, kv_transfer.pack(model, kv_cache, 0, len(prompt), hidden[0]), len(prompt)
            )[0],
        )
        tables.append(table)
        lengths.append(len(prompt))
        tokens.append(int(model.logits(hidden).argmax()))
        decoder.last_tokens[row] = tokens[-1]
    seen = []
    for _ in range(steps):
        width = max(len(t) for t in tables)
        grid = np.zeros((len(prompts), width), dtype=np.int32)
        for i, t in enumerate(tables):
            grid[i, : len(t)] = t
        slots = [
            tables[i][n // cache.block_size] * cache.block_size + n % cache.block_size
            for i, n in enumerate(lengths)
        ]
        logits, argmax = decoder.step(
            StepInputs(list(range(len(prompts))), lengths, slots, [n + 1 for n in lengths], grid)
        )
        assert torch.equal(logits.argmax(-1), argmax)
        seen.append(logits.clone())
        decoder.last_tokens[: len(prompts)] = argmax
        lengths = [n + 1 for n in lengths]
    return seen


def test_batched_decode_over_scattered_blocks_equals_generate(model: LanguageModel) -> None:
    decoder, cache = decoder_for(model, fused=False)
    steps = run_steps(decoder, cache, PROMPTS[:3], 8)
    tokens = torch.stack([s.argmax(-1) for s in steps], dim=1)
    for prompt, row in zip(PROMPTS[:3], tokens, strict=True):
        assert row.tolist() == generate(model, prompt, 9)[1:]


def test_the_fused_step_with_one_attention_call_equals_the_eager_step(model: LanguageModel) -> None:
    """The arithmetic captured on CUDA (fused weights, one paged attention call per layer for
    the whole batch), run eagerly here: same tokens, logits equal to rounding."""
    eager = run_steps(*decoder_for(model, fused=False), PROMPTS[:3], 6)
    fused = run_steps(*decoder_for(model, fused=True), PROMPTS[:3], 6)
    for got, want in zip(fused, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_match_eager_steps(tiny_model: Path) -> None:
    gpu = LanguageModel(str(tiny_model), device="cuda")
    prompts = [[5, 6, 7], list(range(20, 300)), [900, 901, 902, 903]]
    replayed, cache = decoder_for(gpu, fused=True, graphs=True)
    replayed.capture()
    assert replayed._graphs
    got = run_steps(replayed, cache, prompts, 10)
    want = run_steps(*decoder_for(gpu, fused=False), prompts, 10)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)
        assert torch.equal(g.argmax(-1), w.argmax(-1))


# the engine core


@contextlib.contextmanager
def started_cores(model: LanguageModel, **defaults: Any) -> Iterator[Callable[..., EngineCore]]:
    """``make(stage="test", decoding=True, **config)``: a started engine core over `model`,
    its `HfConfig` from `defaults` and `config`; every core made is closed on leaving."""
    made: list[EngineCore] = []

    def make(stage: str = "test", decoding: bool = True, **config: Any) -> EngineCore:
        core = EngineCore(model, HfConfig(**{**defaults, **config}), decoding, stage)
        core.start()
        made.append(core)
        return core

    try:
        yield make
    finally:
        for core in made:
            core.close()


@pytest.fixture
def core_factory(model: LanguageModel) -> Iterator[Callable[..., EngineCore]]:
    with started_cores(model, max_len=256, max_running=8, kv_tokens=8 * 256, page_size=4) as make:
        yield make


async def run(core: EngineCore, prompt: list[int], steps: int, **options: Any) -> list[int]:
    sampling = SamplingOptions.model_validate(
        {"max_tokens": steps, "temperature": 0, "ignore_eos": True, **options}
    )
    tokens: list[int] = []
    async with core.admission("r", len(prompt)) as sequence:
        async for chunk in core.generate(sequence, sampling, set(), Prompt(prompt)):
            tokens.extend(chunk.token_ids)
    return tokens


async def test_requests_beyond_free_blocks_queue_and_blocks_are_reused(
    core_factory: Any, model: LanguageModel, caplog: pytest.LogCaptureFixture
) -> None:
    # 32 blocks of 4: the prompts and their growth cannot all fit at once
    caplog.set_level(logging.INFO, logger="triptych.engines.hf.core")
    core = core_factory(max_len=64, kv_tokens=128, page_size=4)
    assert "test: KV cache of 128 tokens (32 blocks of 4" in caplog.text
    prompts = [*PROMPTS, [3] * 30, list(range(100, 125))]
    steps = [*STEPS, 6, 8]
    depths: list[float] = []
    together = asyncio.ensure_future(
        asyncio.gather(*(run(core, p, n) for p, n in zip(prompts, steps, strict=True)))
    )
    while not together.done():
        depths.append(
            REGISTRY.get_sample_value("triptych_engine_queue_depth", {"stage": "test"}) or 0.0
        )
        await asyncio.sleep(0.001)
    assert together.result() == [generate(model, p, n) for p, n in zip(prompts, steps, strict=True)]
    assert max(depths) >= 1  # requests waited for blocks
    assert core.scheduler.blocks is not None and core.scheduler.blocks.used == 0  # all came back
    assert (
        REGISTRY.get_sample_value("triptych_engine_kv_cache_capacity_tokens", {"stage": "test"})
        == 128
    )


async def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(
    core_factory: Any, model: LanguageModel
) -> None:
    core = core_factory(chunked_prefill_size=16)
    calls: list[str] = []
    decoding = asyncio.Event()
    loop = asyncio.get_running_loop()
    runner = core.runner
    for name in ("prefill", "decode"):
        original = getattr(runner, name)

        def recording(*args: Any, _name: str = name, _original: Any = original) -> Any:
            calls.append(_name)
            if _name == "decode":
                loop.call_soon_threadsafe(decoding.set)
            return _original(*args)

        setattr(runner, name, recording)
    running = asyncio.ensure_future(run(core, [5, 6, 7], 40))
    await decoding.wait()
    long_prompt = list(range(200, 300))  # 100 positions: 7 chunks of 16
    long_tokens, short_tokens = await asyncio.gather(run(core, long_prompt, 5), running)
    assert short_tokens == generate(model, [5, 6, 7], 40)
    assert long_tokens == generate(model, long_prompt, 5)
    prefills = [i for i, call in enumerate(calls) if call == "prefill"]
    assert len(prefills) >= 7
    during = calls[prefills[1] : prefills[6]]
    assert ("prefill", "prefill") not in set(itertools.pairwise(during))


async def test_preempted_sequences_come_back_and_finish_exactly(
    core_factory: Any, model: LanguageModel
) -> None:
    # 20 blocks of 4 = 80 positions for five sequences that grow to 20-25 positions each
    core = core_factory(max_len=32, kv_tokens=80, page_size=4, max_running=5)
    prompts = [[11, 12], [13] * 5, [20, 21, 22], [30] * 4, [50, 60]]
    calls: list[int] = []
    original = core.runner.swap_out

    def counting(sequences: Any) -> None:
        calls.append(len(sequences))
        original(sequences)

    core.runner.swap_out = counting  # type: ignore[method-assign]
    got = await asyncio.gather(*(run(core, p, 20) for p in prompts))
    assert got == [generate(model, p, 20) for p in prompts]
    assert calls  # some sequence had to wait in host memory


async def test_the_same_memory_holds_many_more_short_sequences(model: LanguageModel) -> None:
    """At --context-length 4096, a static cache of one slot per sequence holds two sequences in
    the memory of 2 x 4096 token positions; paged blocks hold sixteen 500-token ones."""
    memory_tokens = 2 * 4096
    slots = memory_tokens // 4096
    core = EngineCore(
        model, HfConfig(max_len=4096, max_running=64, kv_tokens=memory_tokens), True, "kv"
    )
    core.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            admitted = 0
            for _ in range(20):
                try:
                    await asyncio.wait_for(stack.enter_async_context(core.admission("r", 499)), 0.5)
                except TimeoutError:
                    break
                admitted += 1
        assert admitted >= 4 * slots
        assert admitted == 15  # 512 blocks: 32 per sequence, and one spare per live sequence
    finally:
        core.close()


async def test_a_sequence_that_fills_max_len_ends_with_length(core_factory: Any) -> None:
    core = core_factory(max_len=16, kv_tokens=64)
    prompt = list(range(100, 110))
    tokens = await run(core, prompt, 100)
    assert len(tokens) == 16 - len(prompt) + 1  # the last token needs no cache position
    with pytest.raises(ServiceError) as refused:
        async with core.admission("r", 16):
            pass
    assert refused.value.code == ErrorCode.BAD_REQUEST
    assert "--max-model-len 16" in str(refused.value)


def test_a_budget_that_holds_no_sequence_is_refused_at_start(model: LanguageModel) -> None:
    with pytest.raises(ValueError, match="less than one sequence"):
        EngineCore(model, HfConfig(max_len=64, kv_tokens=63), True)
    budget = KVBudget(max_len=64, max_running=2, kv_tokens=10_000, block_size=16)
    assert budget.num_blocks(model.kv_shape, model.device) == 2 * 64 // 16 + 1  # capped


async def test_a_prompt_prefilled_elsewhere_decodes_like_one_prefilled_here(
    core_factory: Any, model: LanguageModel
) -> None:
    """The E/P/D hand-off without the wire: a prefill-only core packs, a decoding core loads."""
    prefill = core_factory(decoding=False, chunked_prefill_size=8)  # chunked on this side
    decode = core_factory()
    prompt = list(range(40, 70))
    tokens, _ = await hand_off(prefill, decode, model, prompt, 10)
    assert tokens == generate(model, prompt, 10)


async def hand_off(
    prefill: EngineCore,
    decode: EngineCore,
    model: LanguageModel,
    prompt: list[int],
    max_tokens: int,
    keys: list[bytes] | None = None,
) -> tuple[list[int], int]:
    """Prefill `prompt` on the prefill-only core, load its packed cache into the decoding core
    and decode greedily there: the tokens, and how many prompt tokens prefill found cached."""
    packed, delta, cached = await prefill.prefill_only("r", Prompt(prompt), keys)
    sampling = SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    tokens: list[int] = []
    async with decode.admission("r", len(prompt)) as sequence:
        sequence.rope_delta = delta
        received = kv_transfer.unpack(model, packed, len(prompt))
        async for chunk in decode.generate(sequence, sampling, set(), Prompt(prompt), received):
            tokens.extend(chunk.token_ids)
    return tokens, cached


async def test_seeded_sampling_repeats_in_any_company(core_factory: Any) -> None:
    core = core_factory()
    options = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 123}
    alone = await run(core, [5, 6, 7, 8], 12, **options)
    crowd = await asyncio.gather(
        run(core, [5, 6, 7, 8], 12, **options),
        *(run(core, p, 12, temperature=1.0) for p in PROMPTS),
    )
    assert crowd[0] == alone
    assert await run(core, [5, 6, 7, 8], 12, **{**options, "seed": 124}) != alone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_the_core_on_cuda_generates_what_generate_does(tiny_model: Path) -> None:
    """Graphs, the Triton kernels, device sampling and the one-step lookahead together."""
    gpu = LanguageModel(str(tiny_model), device="cuda")
    core = EngineCore(gpu, HfConfig(max_len=512, max_running=8, page_size=16), True, "cuda")
    core.start()
    try:
        prompts = [*PROMPTS, list(range(100, 400))]
        steps = [*STEPS, 20]
        got = await asyncio.gather(*(run(core, p, n) for p, n in zip(prompts, steps, strict=True)))
        assert got == [generate(gpu, p, n) for p, n in zip(prompts, steps, strict=True)]
        sampled = {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 5}
        assert await run(core, [5, 6, 7], 16, **sampled) == await run(
            core, [5, 6, 7], 16, **sampled
        )
    finally:
        core.close()
