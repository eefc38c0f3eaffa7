"""Two instances of every worker: load spreads over both; killing one costs no request."""

import asyncio
import json

import nats
import openai

from tests.stack import Stack, start_topology

MODEL = "tiny-qwen2.5-vl"
STAGES = ("encode", "prefill", "decode")


async def requests_per_instance(stack: Stack, component: str) -> dict[str, int]:
    """Ask every instance for its NATS micro stats ($SRV.STATS): requests served."""
    nc = await nats.connect(stack.nats_url)
    inbox = nc.new_inbox()
    answers: list[dict[str, object]] = []

    async def collect(msg: nats.aio.msg.Msg) -> None:
        answers.append(json.loads(msg.data))

    await nc.subscribe(inbox, cb=collect)
    await nc.publish(f"$SRV.STATS.{stack.namespace}-{component}", b"", reply=inbox)
    await asyncio.sleep(0.5)
    await nc.close()
    return {
        str(a["id"]): sum(int(e["num_requests"]) for e in a["endpoints"])  # type: ignore[attr-defined]
        for a in answers
    }


def chat(stack: Stack, text: str) -> str:
    reply = openai.OpenAI(
        base_url=f"{stack.url}/v1", api_key="-", max_retries=0, timeout=30
    ).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=4
    )
    assert reply.choices[0].finish_reason == "length"
    return reply.choices[0].message.content or ""


def test_two_instances_share_load_and_survive_a_kill(stack: Stack) -> None:
    start_topology(stack, "E/P/D", copies=2)
    for i in range(20):
        chat(stack, f"request {i}")
    for component in STAGES:
        counts = asyncio.run(requests_per_instance(stack, component))
        assert len(counts) == 2, (component, counts)
        assert all(n >= 5 for n in counts.values()), (component, counts)

    for component in STAGES:  # kill -9 one instance of every stage
        victim = next(p for p in stack.processes if p.name == component)
        victim.kill()
    for i in range(20):
        chat(stack, f"after the kill {i}")
    for component in STAGES:
        assert len(asyncio.run(requests_per_instance(stack, component))) == 1
