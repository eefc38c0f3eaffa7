"""Encoded images and videos too large for a control-plane message: they wait in the
frontend's registered memory and the encoder READs them over NIXL.

The frontend fetches and checks every image and video once (it needs their sizes to expand
the prompt), so the bytes it checked are the bytes that get encoded: nothing is fetched twice,
and ``data:`` and ``file://`` media work like any other. Small items still ride inline; the
rest travel as a `TensorHandle` in their ``data_handle``, which keeps every NATS message
far below a stock server's 1 MB ``max_payload``. The frontend frees each region when the
request ends (success, failure or cancel), not at the reader's notification: a request that
migrates to another instance before its first token is encoded again there and reads the same
bytes. A reader that never comes (the mock engine reads no pixels) costs nothing beyond the
request's lifetime.
"""

import asyncio
import time
from collections.abc import Sequence
from typing import TypeVar, cast

import torch

from triptych.observability import metrics
from triptych.protocol import ErrorCode, MediaItem, ServiceError, TensorHandle, VideoItem
from triptych.transfer.nixl import PoolFull, TransferAgent, TransferError

INLINE_BYTES = 256 * 1024
"""Default for the encoded bytes of one request that may ride inside its NATS message (the
sum over its images and videos, before base64); items beyond it move by NIXL."""

Item = TypeVar("Item", bound=MediaItem)


async def offload(
    agent: TransferAgent,
    images: Sequence[Item],
    key_prefix: str,
    inline_bytes: int = INLINE_BYTES,
    timeout_s: float = 30.0,
) -> list[Item]:
    """The items (images, videos) with every one that does not fit the inline budget exported
    to `agent`'s pool (smallest stay inline first). Waits up to `timeout_s` while the pool is
    full."""
    order = sorted(range(len(images)), key=lambda i: len(images[i].data or b""))
    out = list(images)
    budget = inline_bytes
    try:
        for i in order:
            data = images[i].data
            if data is None:
                continue
            if len(data) <= budget:
                budget -= len(data)
                continue
            tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            ref = await agent.export_when_space(tensor, f"{key_prefix}-{i}", timeout_s, keep=True)
            update = {"data": None, "data_handle": ref}
            out[i] = cast(Item, images[i].model_copy(update=update))
    except BaseException:
        release(agent, out)
        raise
    return out


def release(agent: TransferAgent, images: Sequence[MediaItem]) -> None:
    """Free what `offload` exported for these items (idempotent)."""
    for image in images:
        if image.data_handle is not None:
            agent.release(image.data_handle.key)


async def fetch(
    agent: TransferAgent | None, images: Sequence[Item], timeout_s: float = 30.0
) -> list[Item]:
    """The items with the bytes of every exported one read into `data` (concurrently).

    Without an agent (the mock engine, which reads no pixels) the items come back as they are.
    """
    if agent is None or all(image.data_handle is None for image in images):
        return list(images)
    return list(await asyncio.gather(*(_fetch_one(agent, image, timeout_s) for image in images)))


async def _fetch_one(agent: TransferAgent, image: Item, timeout_s: float) -> Item:
    handle: TensorHandle | None = image.data_handle
    if handle is None:
        return image
    kind = "video" if isinstance(image, VideoItem) else "image"
    started = time.perf_counter()
    try:
        tensor = await agent.fetch(handle, timeout_s)
    except (TransferError, PoolFull) as error:
        metrics.TRANSFER_DURATION.labels(kind, "error").observe(time.perf_counter() - started)
        message = f"{kind} bytes could not be read: {error}"
        raise ServiceError(ErrorCode.UNAVAILABLE, message) from error
    data = tensor.cpu().numpy().tobytes()
    metrics.TRANSFER_BYTES.labels(kind, "ok").inc(len(data))
    metrics.TRANSFER_DURATION.labels(kind, "ok").observe(time.perf_counter() - started)
    return cast(Item, image.model_copy(update={"data": data, "data_handle": None}))
