"""Two instances of every worker: load spreads over both; killing one costs no request."""

import asyncio
import base64
import io

import openai
from PIL import Image

from tests.stack import Stack, micro_stats, start_topology

MODEL = "tiny-qwen2.5-vl"
STAGES = ("encode", "prefill", "decode")


async def requests_per_instance(stack: Stack, component: str) -> dict[str, int]:
    """Requests each live instance served (from NATS micro STATS)."""
    return {i: int(v["requests"]) for i, v in (await micro_stats(stack, component)).items()}


def picture(shade: int) -> str:
    """A small image of its own: encoders are picked by the image's content, so the load
    spreads only over different pictures."""
    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (shade, 255 - shade, 7)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(stack: Stack, text: str, shade: int) -> str:
    """One request with a small image, so that it passes every stage (text alone skips the
    encode worker)."""
    content = [
        {"type": "image_url", "image_url": {"url": picture(shade)}},
        {"type": "text", "text": text},
    ]
    reply = openai.OpenAI(
        base_url=f"{stack.url}/v1", api_key="-", max_retries=0, timeout=30
    ).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=4,
    )
    assert reply.choices[0].finish_reason == "length"
    return reply.choices[0].message.content or ""


def test_two_instances_share_load_and_survive_a_kill(stack: Stack) -> None:
    start_topology(stack, "E/P/D", copies=2)
    for i in range(20):
        chat(stack, f"request {i}", i)
    for component in STAGES:
        counts = asyncio.run(requests_per_instance(stack, component))
        assert len(counts) == 2, (component, counts)
        assert all(n >= 5 for n in counts.values()), (component, counts)

    for component in STAGES:  # kill -9 one instance of every stage
        victim = next(p for p in stack.processes if p.name == component)
        victim.kill()
    for i in range(20):
        chat(stack, f"after the kill {i}", 100 + i)
    for component in STAGES:
        assert len(asyncio.run(requests_per_instance(stack, component))) == 1
