"""One context limit: decode workers announce ``--max-model-len`` in their discovery metadata,
the frontend refuses a longer request with the worker's own 400 before it travels."""

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.stack import Stack, micro_stats, start_topology
from triptych.protocol import GenerateRequest, SamplingOptions, ServiceError, over_context
from triptych.runtime import Runtime, RuntimeConfig

MODEL = "tiny-qwen2.5-vl"
LIMIT = 64


async def _worker_answer(stack: Stack, token_ids: list[int]) -> tuple[int | None, str]:
    """The decode component's announced limit, and what a decode instance answers when the
    request skips the frontend."""
    config = RuntimeConfig(nats_url=stack.nats_url, namespace=stack.namespace)
    async with Runtime(config, "probe") as runtime:
        decode = await runtime.client("decode")
        assert await decode.instances.wait_for_any(10)
        request = GenerateRequest(
            model=MODEL, token_ids=token_ids, sampling=SamplingOptions(max_tokens=4)
        )
        stream = await decode.call(request, request_id="direct", deadline=time.time() + 60)
        with pytest.raises(ServiceError) as refused:
            async for _ in stream:
                pass
        return decode.context_length, refused.value.info.message


@pytest.mark.parametrize("topology", ["EPD", "P/D"])
def test_frontend_refuses_a_prompt_over_the_announced_max_model_len(
    stack: Stack, tiny_model: Path, topology: str
) -> None:
    start_topology(
        stack, topology, "--max-model-len", str(LIMIT), engine="hf", model_path=str(tiny_model)
    )
    card = httpx.get(f"{stack.url}/v1/models", timeout=10).json()["data"][0]
    assert card["max_model_len"] == LIMIT  # the workers' limit, not the model's 4096

    too_long = list(range(100, 100 + LIMIT))  # no position left to generate
    reply = httpx.post(
        f"{stack.url}/v1/completions", json={"model": MODEL, "prompt": too_long}, timeout=30
    )
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert message == over_context(LIMIT, LIMIT).info.message
    assert f"--max-model-len {LIMIT}" in message
    assert all(s["requests"] == 0 for s in asyncio.run(micro_stats(stack, "decode")).values())

    announced, worker_message = asyncio.run(_worker_answer(stack, too_long))
    assert announced == LIMIT
    assert worker_message == message  # one 400, whichever side refuses

    fits = {"model": MODEL, "prompt": too_long[:40], "max_tokens": 8}
    assert httpx.post(f"{stack.url}/v1/completions", json=fits, timeout=60).status_code == 200
    over = {**fits, "max_tokens": LIMIT}
    refused = httpx.post(f"{stack.url}/v1/completions", json=over, timeout=30).json()["error"]
    assert refused["param"] == "max_tokens"
    assert refused["message"] == over_context(40, LIMIT, LIMIT).info.message
