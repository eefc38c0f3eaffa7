"""Image and video embeddings between encoder and reader: the in-memory form and how it travels.

An encoder `publish`es a request's embeddings and forwards the returned handle; the reader
`read`s them (a NIXL READ straight from the encoder's registered memory) and its completion
notification frees the encoder's region. Embeddings without bytes (the mock engine's) travel
as a "simulated" handle that only carries their shape.
"""

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from triptych.observability import metrics
from triptych.protocol import ErrorCode, MediaItem, ServiceError, TensorHandle
from triptych.transfer import image_bytes
from triptych.transfer.nixl import PoolFull, TransferAgent, TransferError

SIMULATED = "simulated"
Item = TypeVar("Item", bound=MediaItem)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageEmbeddings:
    """The vision tower's output for one request's images and videos, rows in prompt order."""

    num_tokens: int
    """Rows: must equal the sum of the images' and videos' `num_tokens`."""
    hidden_size: int
    tensor: Any = None
    """A ``torch.Tensor`` [num_tokens, hidden_size], or None when simulated."""


class EmbeddingTransport:
    """Publishes embeddings for a reader and reads them back (NIXL, or simulated)."""

    def __init__(self, agent: TransferAgent | None, timeout_s: float = 30.0) -> None:
        self.agent = agent
        self.timeout_s = timeout_s
        """How long a read waits for its bytes; published embeddings wait twice as long, so a
        region is never reused while a READ into it may still run."""

    async def publish(self, embeddings: ImageEmbeddings, key: str) -> TensorHandle:
        """Make the embeddings readable by another process under `key` (waiting while the
        transfer pool is full)."""
        if embeddings.tensor is None:
            return TensorHandle(
                agent=SIMULATED, shape=(embeddings.num_tokens, embeddings.hidden_size), dtype="none"
            )
        if self.agent is None:
            raise ServiceError(ErrorCode.INTERNAL, "real embeddings need a transfer agent")
        return await self.agent.export_when_space(embeddings.tensor, key, self.timeout_s)

    async def released(self, handle: TensorHandle, deadline: float) -> bool:
        """Wait until the reader has the embeddings (True), or the request's `deadline` (Unix
        time) passed; either way the encoder's region is free afterwards.

        The embeddings are the request's for as long as it lives: a request queued behind
        others for a KV slot finds them still there however long it waited (a cancel frees
        them at once, through `release`). They are held at least twice the read timeout, so
        a region is never reused while a READ into it may still run.
        """
        if handle.agent == SIMULATED or self.agent is None:
            return True
        hold = deadline - time.time() if math.isfinite(deadline) else 0.0
        return await self.agent.wait_released(handle.key, max(hold, 2 * self.timeout_s))

    def release(self, handle: TensorHandle) -> None:
        """Free the region now (the request was cancelled)."""
        if handle.agent != SIMULATED and self.agent is not None:
            self.agent.release(handle.key)

    async def fetch_images(self, images: Sequence[Item]) -> list[Item]:
        """The images (or videos) with the bytes the frontend left in its registered memory
        read into `data` (see `image_bytes`)."""
        return await image_bytes.fetch(self.agent, images, self.timeout_s)

    async def read(self, handle: TensorHandle) -> ImageEmbeddings:
        """Fetch the embeddings behind a handle."""
        if len(handle.shape) != 2:
            raise ServiceError(ErrorCode.INTERNAL, f"embeddings of shape {handle.shape}")
        rows, hidden = handle.shape
        if handle.agent == SIMULATED:
            return ImageEmbeddings(num_tokens=rows, hidden_size=hidden)
        if self.agent is None:
            raise ServiceError(ErrorCode.INTERNAL, "real embeddings need a transfer agent")
        started = time.perf_counter()
        try:
            tensor = await self.agent.fetch(handle, self.timeout_s)
        except (TransferError, PoolFull) as error:
            metrics.TRANSFER_DURATION.labels("embedding", "error").observe(
                time.perf_counter() - started
            )
            raise ServiceError(
                ErrorCode.UNAVAILABLE, f"image embeddings could not be read: {error}"
            ) from error
        metrics.TRANSFER_BYTES.labels("embedding", "ok").inc(tensor.numel() * tensor.element_size())
        metrics.TRANSFER_DURATION.labels("embedding", "ok").observe(time.perf_counter() - started)
        log.info(
            "embeddings %s: %d bytes read in %.3f ms",
            handle.key,
            tensor.numel() * tensor.element_size(),
            (time.perf_counter() - started) * 1e3,
        )
        return ImageEmbeddings(num_tokens=rows, hidden_size=hidden, tensor=tensor)
