"""What the GPU benchmarks send and time: a greedy chat request with images, streamed.

`chat_body` builds the request (128 tokens by default, ``ignore_eos``, token ids returned);
`stream_chat` sends it and records when each token-bearing chunk arrived.
"""

import base64
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image


def png(size: int) -> bytes:
    """A noisy square PNG (noise, so no encoder can shortcut it)."""
    buffer = io.BytesIO()
    Image.effect_noise((size, size), 64).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def picture(size: int) -> str:
    """`png` as a data URL."""
    return "data:image/png;base64," + base64.b64encode(png(size)).decode()


def chat_body(model: str, images: list[str], text: str, max_tokens: int) -> dict[str, Any]:
    """A streamed, greedy request for `max_tokens` tokens whatever the model says."""
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    content.append({"type": "text", "text": text})
    return {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "return_token_ids": True,
        "messages": [{"role": "user", "content": content}],
    }


@dataclass
class Streamed:
    """One streamed request, timed (`time.perf_counter` seconds)."""

    start: float
    end: float = 0.0
    stamps: list[float] = field(default_factory=list)
    """When each chunk that carried tokens arrived."""
    tokens: int = 0
    prompt_tokens: int = 0

    @property
    def ttft_s(self) -> float:
        return self.stamps[0] - self.start if self.stamps else 0.0

    @property
    def step_s(self) -> float:
        """Mean time per token after the first."""
        return (self.stamps[-1] - self.stamps[0]) / (self.tokens - 1) if self.tokens > 1 else 0.0


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any] | bytes) -> Streamed:
    """Send `body` (or its JSON, encoded beforehand: a load generator's event loop should not
    spend its time encoding megabytes of images) to ``/v1/chat/completions`` and time its
    chunks (HTTPStatusError if not 200)."""
    record = Streamed(start=time.perf_counter())
    sent = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    async with client.stream("POST", "/v1/chat/completions", **sent) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            record.prompt_tokens = (chunk.get("usage") or {}).get(
                "prompt_tokens", record.prompt_tokens
            )
            ids = chunk["choices"][0].get("token_ids") if chunk.get("choices") else None
            if ids:
                record.stamps.append(time.perf_counter())
                record.tokens += len(ids)
    record.end = time.perf_counter()
    return record
