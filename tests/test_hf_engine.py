"""The hf engine's parts: a vision-only encoder that batches (packed window attention,
threaded preprocessing), batched decode over the KV pool,
queueing beyond the KV budget, sampling rules."""

import asyncio
import copy
import io
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from prometheus_client import REGISTRY
from safetensors import safe_open
from torch.nn import functional as F
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from triptych.engines.hf.decoder import Decoder
from triptych.engines.hf.encode import HfEncodeEngine
from triptych.engines.hf.executor import Decoding, ModelExecutor
from triptych.engines.hf.kv_cache import KVBudget, KVPool
from triptych.engines.hf.model import LanguageModel, Prompt, SequenceKV
from triptych.engines.hf.sampler import Sampler
from triptych.engines.hf.streaming import decode_stream
from triptych.models import load_adapter
from triptych.models.vision_attention import pack_window_attention
from triptych.models.vision_tower import VisionTower
from triptych.protocol import (
    ErrorCode,
    GenerateRequest,
    ImageItem,
    SamplingOptions,
    ServiceError,
)


def image_item(model_path: Path, width: int, height: int) -> ImageItem:
    buffer = io.BytesIO()
    Image.effect_noise((width, height), 60).convert("RGB").save(buffer, format="PNG")
    adapter = load_adapter(model_path)
    assert adapter is not None
    layout = adapter.image_layout(height, width)
    return ImageItem(
        width=width,
        height=height,
        grid_thw=layout.grid_thw,
        num_tokens=layout.num_tokens,
        offset=0,
        data=buffer.getvalue(),
    )


async def test_encoder_holds_only_the_vision_tower(tiny_model: Path) -> None:
    engine = HfEncodeEngine(str(tiny_model))
    await engine.start()
    assert engine.tower is not None
    names = [name for name, _ in engine.tower.module.named_parameters()]
    assert not [n for n in names if "embed_tokens" in n or "lm_head" in n or "layers." in n]
    with safe_open(str(tiny_model / "model.safetensors"), framework="pt") as weights:
        keys = [k for k in weights.keys() if k.startswith("visual.")]  # noqa: SIM118
        vision = sum(weights.get_tensor(k).numel() for k in keys)
    assert sum(p.numel() for p in engine.tower.module.parameters()) == vision
    await engine.close()


async def test_concurrent_requests_share_one_vision_forward(tiny_model: Path) -> None:
    engine = HfEncodeEngine(str(tiny_model))
    await engine.start()
    assert engine.tower is not None
    requests = [
        [image_item(tiny_model, 84, 56)],
        [image_item(tiny_model, 56, 56), image_item(tiny_model, 140, 84)],
        [image_item(tiny_model, 70, 126)],
    ]
    alone = [await engine.encode(f"r{i}", images) for i, images in enumerate(requests)]
    forwards = 0
    original = engine.tower.encode

    def counting(*args: object) -> torch.Tensor:
        nonlocal forwards
        forwards += 1
        return original(*args)  # type: ignore[arg-type]

    engine.tower.encode = counting  # type: ignore[method-assign]
    together = await asyncio.gather(
        *(engine.encode(f"t{i}", images) for i, images in enumerate(requests))
    )
    assert forwards == 1
    for single, batched, images in zip(alone, together, requests, strict=True):
        assert batched.num_tokens == sum(image.num_tokens for image in images)
        torch.testing.assert_close(batched.tensor, single.tensor, rtol=1e-5, atol=1e-6)
    await engine.close()


async def test_an_inline_encoder_runs_its_forwards_where_it_is_told(tiny_model: Path) -> None:
    """An aggregated worker on CUDA hands its model thread to its inline encoder."""
    ran: list[str] = []

    async def runner(work: Callable[[], Any]) -> Any:
        ran.append("runner")
        return work()

    engine = HfEncodeEngine(str(tiny_model), runner=runner)
    await engine.start()
    assert engine.tower is not None
    preprocess = engine.tower.preprocess

    def recording(images: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        ran.append(threading.current_thread().name)
        return preprocess(images)

    engine.tower.preprocess = recording  # type: ignore[method-assign]
    embeddings = await engine.encode("r", [image_item(tiny_model, 56, 84)])
    # preprocessing (host work) stays off the runner, which gets only the forward
    assert ran[1:] == ["runner"] and ran[0] != threading.current_thread().name
    assert embeddings.num_tokens == 6
    await engine.close()


SIZES = ((448, 448), (300, 517), (640, 200))
"""A regular image (windows of one length) and two whose edge windows are shorter."""


def test_packed_window_attention_is_transformers_arithmetic_in_fewer_calls(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tower = VisionTower(str(tiny_model))
    packed = tower.module
    plain = copy.deepcopy(packed)
    for module in plain.modules():
        vars(module).pop("forward", None)  # back to transformers' window-by-window forward
    calls = 0
    sdpa = F.scaled_dot_product_attention

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)

    def run(module: torch.nn.Module, images: Sequence[bytes]) -> tuple[torch.Tensor, int]:
        nonlocal calls
        tower.module, calls = module, 0
        return tower.encode(*tower.preprocess(images)), calls

    mixed = [image_item(tiny_model, w, h).data or b"" for w, h in SIZES]
    out, mixed_calls = run(packed, mixed)
    expected, plain_calls = run(plain, mixed)
    assert torch.equal(out, expected)
    assert plain_calls > 3 * mixed_calls
    square = [image_item(tiny_model, 448, 448).data or b"" for _ in range(2)]
    out, square_calls = run(packed, square)
    assert torch.equal(out, run(plain, square)[0])
    assert square_calls == 2  # a call per layer: 32 windows of one length, then 2 whole images


@torch.inference_mode()
def test_packing_covers_qwen2_vl_towers_too() -> None:
    """Qwen2-VL attends per whole image: images of one size share a call."""
    config = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=48, num_heads=2, mlp_ratio=2)
    plain = Qwen2VisionTransformerPretrainedModel._from_config(config).eval()
    packed = copy.deepcopy(plain)
    assert pack_window_attention(packed) == 2
    grids = torch.tensor([[1, 8, 8], [1, 6, 10], [1, 8, 8]])
    pixels = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14)
    expected, got = plain(pixels, grid_thw=grids), packed(pixels, grid_thw=grids)
    assert torch.equal(expected.pooler_output, got.pooler_output)


def test_images_preprocessed_on_threads_match_one_processor_call(tiny_model: Path) -> None:
    tower = VisionTower(str(tiny_model))
    images = [image_item(tiny_model, w, h).data or b"" for w, h in SIZES]
    pixels, grids = tower.preprocess(images)
    pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    whole = tower.processor(images=pictures, return_tensors="pt")
    assert torch.equal(pixels, whole["pixel_values"])
    assert torch.equal(grids, whole["image_grid_thw"])


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> LanguageModel:
    return LanguageModel(str(tiny_model))


QUEUE = "triptych_engine_queue_depth"


def greedy(model: LanguageModel, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens of one sequence decoded alone."""
    decoder = Decoder(model, KVPool(model.kv_shape, 1, 128, model.device))
    sequence, hidden = model.prefill(prompt, [], None)
    length = decoder.pool.load(0, sequence.kv)
    tokens = [int(model.logits(hidden[None]).argmax())]
    for _ in range(steps - 1):
        _, argmax = decoder.step([tokens[-1]], [length], [length])
        length += 1
        tokens.append(int(argmax[0]))
    return tokens


def test_batched_decode_matches_one_at_a_time(model: LanguageModel) -> None:
    prompts = [[5, 6, 7], list(range(20, 60)), [900, 901, 902, 903, 904, 905, 906]]
    alone = [greedy(model, prompt, 10) for prompt in prompts]
    decoder = Decoder(model, KVPool(model.kv_shape, 4, 128, model.device))
    states: list[tuple[SequenceKV, torch.Tensor]] = [model.prefill(p, [], None) for p in prompts]
    lengths = [decoder.pool.load(slot, state[0].kv) for slot, state in enumerate(states)]
    tokens = [int(t) for t in model.logits(torch.stack([s[1] for s in states])).argmax(-1)]
    batched = [[t] for t in tokens]
    for _ in range(9):
        logits, argmax = decoder.step(tokens, lengths, lengths)
        assert torch.equal(logits.argmax(-1), argmax)
        lengths = [length + 1 for length in lengths]
        tokens = argmax.tolist()
        for out, token in zip(batched, tokens, strict=True):
            out.append(token)
    assert batched == alone


def test_the_graph_step_pads_and_masks_like_the_eager_step(model: LanguageModel) -> None:
    """The arithmetic captured on CUDA (batch and span padded, grouped masked attention), run
    eagerly here: same tokens, logits equal to rounding."""
    prompts = [[5, 6, 7], list(range(20, 60)), [900, 901, 902, 903]]
    decoder = Decoder(model, KVPool(model.kv_shape, 8, 512, model.device), cuda_graphs=False)
    states = [model.prefill(p, [], None) for p in prompts]
    lengths = [decoder.pool.load(slot, state[0].kv) for slot, state in enumerate(states)]
    tokens = [11, 12, 13]
    eager_logits, eager_argmax = (t.clone() for t in decoder.step(tokens, lengths, lengths))
    for slot, state in enumerate(states):  # undo the eager step's KV writes
        decoder.pool.load(slot, state[0].kv)
    batch, span = decoder.padded(tokens, lengths, lengths)
    assert (batch, span) == (4, 256)  # 3 rows padded to 4; positions up to 40 in 256
    with torch.inference_mode():
        decoder._graph_step(batch, span)
    torch.testing.assert_close(decoder._logits[:3], eager_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(decoder._argmax[:3], eager_argmax)


def test_prefills_batched_with_padding_match_one_at_a_time(model: LanguageModel) -> None:
    """What CUDA does with prefills queued together (CPU prefills one at a time, for exactness)."""
    assert model.image_token_id is not None
    image = [5, 6, *[model.image_token_id] * 4, 7, 8, 9]
    embeddings = torch.randn(4, model.hidden_size, generator=torch.Generator().manual_seed(3))
    prompts: list[Prompt] = [
        (list(range(20, 60)), [], None),
        (image, [(1, 4, 4)], embeddings),
        ([900, 901, 902], [], None),
    ]
    batched = model.prefill_batch(prompts)
    for (sequence, hidden), prompt in zip(batched, prompts, strict=True):
        alone, alone_hidden = model.prefill(*prompt)
        assert (sequence.length, sequence.rope_delta) == (alone.length, alone.rope_delta)
        torch.testing.assert_close(hidden, alone_hidden, rtol=1e-4, atol=1e-5)
        for (keys, values), (want_keys, want_values) in zip(sequence.kv, alone.kv, strict=True):
            torch.testing.assert_close(keys, want_keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(values, want_values, rtol=1e-4, atol=1e-5)


def greedy_steps(decoder: Decoder, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Each step's logits for the prompts decoded together, greedily."""
    model = decoder.model
    states = [model.prefill(p, [], None) for p in prompts]
    lengths = [decoder.pool.load(slot, state[0].kv) for slot, state in enumerate(states)]
    tokens = model.logits(torch.stack([state[1] for state in states])).argmax(-1).tolist()
    seen = []
    for _ in range(steps):
        logits, argmax = decoder.step(tokens, lengths, lengths)
        seen.append(logits.clone())
        tokens, lengths = argmax.tolist(), [length + 1 for length in lengths]
    return seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_match_eager_steps(tiny_model: Path) -> None:
    model = LanguageModel(str(tiny_model), device="cuda")
    prompts = [[5, 6, 7], list(range(20, 300)), [900, 901, 902, 903]]  # spans 256 and 512

    def decoder(graphs: bool) -> Decoder:
        built = Decoder(model, KVPool(model.kv_shape, 6, 1024, model.device), graphs)
        built.capture()
        return built

    replayed = decoder(True)
    assert replayed.cuda_graphs and replayed._graphs
    for batch in (prompts, prompts[:1]):
        expected = greedy_steps(decoder(False), batch, 12)
        for got, want in zip(greedy_steps(replayed, batch, 12), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
            assert torch.equal(got.argmax(-1), want.argmax(-1))


async def generate_all(
    executor: ModelExecutor, prompts: list[list[int]], steps: list[int]
) -> list[list[int]]:
    """Run every prompt through `executor` at once, each holding a slot reservation."""

    async def one(prompt: list[int], max_tokens: int) -> list[int]:
        request = GenerateRequest(
            model="tiny",
            token_ids=prompt,
            sampling=SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        )
        tokens: list[int] = []
        async with executor.reservation(len(prompt)):
            sequence, hidden = await executor.call(lambda: executor.model.prefill(prompt, [], None))
            async for chunk in decode_stream(executor, "r", request, sequence, hidden):
                tokens.extend(chunk.token_ids)
        return tokens

    return list(await asyncio.gather(*(one(p, n) for p, n in zip(prompts, steps, strict=True))))


async def test_requests_beyond_the_kv_budget_queue_and_slots_are_reused(
    model: LanguageModel,
) -> None:
    decoding = Decoding(KVBudget(max_len=64, kv_tokens=2 * 64 + 10), cuda_graphs=False)
    executor = ModelExecutor(model, decoding)
    assert executor.slots == 2
    executor.start()
    prompts = [[5, 6, 7], list(range(20, 50)), [900, 901, 902], [7, 8], [40] * 10, [3] * 5]
    steps = [12, 4, 9, 7, 3, 10]  # different lengths: sequences leave mid-batch and slots move
    depths: list[float] = []
    sampling = asyncio.ensure_future(generate_all(executor, prompts, steps))
    while not sampling.done():
        depths.append(REGISTRY.get_sample_value(QUEUE, {"stage": "decode"}) or 0.0)
        await asyncio.sleep(0.001)
    try:
        assert sampling.result() == [
            greedy(model, p, n) for p, n in zip(prompts, steps, strict=True)
        ]
        assert max(depths) >= 1  # requests waited for a slot
    finally:
        executor.close()


async def test_a_sequence_that_fills_its_slot_ends_with_length(model: LanguageModel) -> None:
    executor = ModelExecutor(model, Decoding(KVBudget(max_len=16, kv_tokens=16), cuda_graphs=False))
    executor.start()
    try:
        prompt = list(range(100, 110))
        [tokens] = await generate_all(executor, [prompt], [100])
        assert len(tokens) == 16 - len(prompt) + 1  # the last token needs no slot position
        with pytest.raises(ServiceError) as refused:
            async with executor.reservation(16):
                pass
        assert refused.value.code == ErrorCode.BAD_REQUEST
        assert "--max-model-len 16" in str(refused.value)
    finally:
        executor.close()


def test_a_budget_that_holds_no_sequence_is_refused_at_start(model: LanguageModel) -> None:
    with pytest.raises(ValueError, match="less than one sequence"):
        ModelExecutor(model, Decoding(KVBudget(max_len=64, kv_tokens=63)))


def sampler(model: LanguageModel, stops: set[int] | None = None, **options: object) -> Sampler:
    opts = SamplingOptions.model_validate({"max_tokens": 8, **options})
    return Sampler(opts, [1, 2, 3], stops or set(), model.vocab_size, model.device)


def test_sampling_rules(model: LanguageModel) -> None:
    logits = torch.linspace(-3, 3, model.vocab_size)
    best = int(logits.argmax())
    assert sampler(model, temperature=0).next_token(logits) == best
    assert sampler(model, temperature=1.5, top_k=1).next_token(logits) == best
    assert sampler(model, temperature=1.0, min_p=0.999).next_token(logits) == best
    kept = sampler(model, {best}, temperature=0, min_tokens=2)
    assert kept.next_token(logits) != best  # EOS masked before min_tokens
    stopping = sampler(model, {best}, temperature=0)
    stopping.next_token(logits)
    assert stopping.finished() == "stop"
    penalized = sampler(model, temperature=0, repetition_penalty=2.0)
    penalized.next_token(logits)
    assert penalized.next_token(logits) != best  # repeated token pushed down
    first, second = (sampler(model, temperature=1.0, seed=7) for _ in range(2))
    assert [first.next_token(logits) for _ in range(5)] == [
        second.next_token(logits) for _ in range(5)
    ]


def test_logprobs_come_from_the_distribution_drawn_from(model: LanguageModel) -> None:
    logits = torch.linspace(-3, 3, model.vocab_size)
    greedy = sampler(model, temperature=0, logprobs=2)
    token = greedy.next_token(logits.clone())
    raw = torch.log_softmax(logits, -1)
    assert greedy.logprobs is not None
    assert greedy.logprobs.logprob == pytest.approx(float(raw[token]))
    assert [t for t, _ in greedy.logprobs.top] == torch.topk(raw, 2).indices.tolist()
    warm = sampler(model, temperature=0.5, seed=1, logprobs=0)
    drawn = warm.next_token(logits.clone())
    assert warm.logprobs is not None and warm.logprobs.top == []
    assert warm.logprobs.logprob == pytest.approx(float(torch.log_softmax(logits / 0.5, -1)[drawn]))
    penalized = sampler(model, temperature=0, logprobs=1, repetition_penalty=2.0)
    first = penalized.next_token(logits.clone())
    penalized.next_token(logits.clone())
    assert penalized.logprobs is not None
    assert penalized.logprobs.top[0][0] != first  # after the penalty, not before
