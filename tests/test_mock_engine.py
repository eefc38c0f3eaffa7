"""The mock engine: deterministic tokens, real stop rules, costs as configured (a real
model's by default), honest logprobs."""

import math
import time

from triptych.engines.mock import MockAggregatedEngine, MockConfig, mock_tokens
from triptych.protocol import GenerateRequest, SamplingOptions, TokenChunk

FREE = MockConfig(encode_s_per_image=0.0, prefill_s_per_token=0.0, decode_s_per_step=0.0)


def request(**sampling: object) -> GenerateRequest:
    options = SamplingOptions.model_validate({"max_tokens": 16, **sampling})
    return GenerateRequest(model="m", token_ids=[1, 2, 3], sampling=options, eos_token_ids=[7])


async def run(engine: MockAggregatedEngine, req: GenerateRequest) -> list[TokenChunk]:
    return [chunk async for chunk in engine.generate("r", req, None)]


def test_tokens_depend_on_prompt_and_seed_only() -> None:
    assert mock_tokens(request(seed=1), 0, 100) == mock_tokens(request(seed=1), 0, 100)
    assert mock_tokens(request(seed=1), 0, 100) != mock_tokens(request(seed=2), 0, 100)


async def test_zero_cost_emits_everything_at_once() -> None:
    chunks = await run(MockAggregatedEngine(FREE), request(seed=3))
    assert len(chunks) == 1 and len(chunks[0].token_ids) == 16
    assert chunks[0].finish_reason == "length"


async def test_stop_token_ids_respect_min_tokens() -> None:
    tokens = mock_tokens(request(seed=4), 256, 1024)
    stop_at = tokens[2]
    engine = MockAggregatedEngine(FREE)
    chunks = await run(engine, request(seed=4, stop_token_ids=[stop_at]))
    assert chunks[-1].finish_reason == "stop"
    assert sum(len(c.token_ids) for c in chunks) == tokens.index(stop_at) + 1
    later = await run(engine, request(seed=4, stop_token_ids=[stop_at], min_tokens=16))
    assert later[-1].finish_reason == "length"


async def test_decode_cost_streams_one_token_per_step() -> None:
    engine = MockAggregatedEngine(MockConfig(decode_s_per_step=0.01))
    begun = time.monotonic()
    chunks = await run(engine, request(max_tokens=10))
    assert [len(c.token_ids) for c in chunks] == [1] * 10
    assert time.monotonic() - begun >= 0.1


async def test_default_costs_stream_token_by_token_like_a_model() -> None:
    config = MockConfig()
    assert config.decode_s_per_step > 0 and config.prefill_s_per_token > 0
    assert config.encode_s_per_image > 0
    chunks = await run(MockAggregatedEngine(config), request(max_tokens=3))
    assert [len(c.token_ids) for c in chunks] == [1, 1, 1]


async def test_logprobs_are_those_of_the_uniform_draw() -> None:
    chunks = await run(MockAggregatedEngine(FREE), request(seed=5, logprobs=3, max_tokens=4))
    tokens = [t for c in chunks for t in c.token_ids]
    entries = [e for c in chunks for e in c.logprobs or []]
    assert len(entries) == len(tokens) == 4
    for token, entry in zip(tokens, entries, strict=True):
        assert entry.logprob == -math.log(FREE.vocab_high - FREE.vocab_low)
        assert [t for t, _ in entry.top] == [token, token + 1, token + 2] or token > 1020
    plain = await run(MockAggregatedEngine(FREE), request(seed=5, max_tokens=4))
    assert all(c.logprobs is None for c in plain)
