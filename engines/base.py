"""Engine interfaces: what a worker asks of the machinery that runs the model.

Every engine (``hf``, ``sglang``, ``mock``) implements the roles it supports behind these four
interfaces; the components never know which engine they drive.

Lifecycle, common to all roles:

1. ``await engine.start()`` once, before the worker registers (loads weights, starts a
   bootstrap server, warms up).
2. Per request, the worker calls the role's method (``encode``, ``prefill`` or ``generate``);
   calls for different requests run concurrently and the engine batches them as it sees fit.
   Decode and aggregated workers first enter ``engine.admit(request)``, which waits for
   capacity (KV blocks for the prompt) so that a request that does not fit yet queues instead
   of failing.
3. Cancellation is abort: the worker cancels the task awaiting ``encode``/``prefill`` or stops
   iterating ``generate``; the engine frees everything the request held (KV blocks, buffers,
   rooms) in its ``finally`` blocks, and never leaves work running for it.
4. ``await engine.close()`` once, after the worker drained; safe to call twice.

Failures are raised as `ServiceError` (with an HTTP-style code) when the cause is known, any
other exception being reported as an internal error.
"""

import abc
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from triptych.protocol import BootstrapInfo, GenerateRequest, ImageItem, TokenChunk, VideoItem
from triptych.transfer.embeddings import ImageEmbeddings

Runner = Callable[[Callable[[], Any]], Awaitable[Any]]
"""Runs a blocking piece of model work somewhere off the event loop and awaits its result."""


class Engine:
    """Start and close; see the module docstring for the lifecycle."""

    async def start(self) -> None:
        """Load and warm up."""

    async def close(self) -> None:
        """Release everything. Safe to call twice."""

    def model_runner(self) -> Runner | None:
        """Where an encoder in the same process should run its model work, so that one thread
        owns the device (None: on a thread of its own)."""
        return None


class EncodeEngine(Engine, abc.ABC):
    """Runs the vision tower (only the vision tower: no language-model weights)."""

    @abc.abstractmethod
    async def encode(
        self, request_id: str, images: Sequence[ImageItem], videos: Sequence[VideoItem] = ()
    ) -> ImageEmbeddings:
        """Embed the images and videos (each carries its encoded bytes in `data`); rows come
        back in prompt order (by `offset`). An engine that reads no videos refuses them with
        a 400."""


class PrefillEngine(Engine, abc.ABC):
    """Runs prefill and hands the KV cache to decode through a bootstrap room."""

    @property
    @abc.abstractmethod
    def bootstrap_address(self) -> tuple[str, int]:
        """``(host, port)`` where decode instances join rooms (known after `start`)."""

    def bootstrap_info(self, room: int) -> BootstrapInfo:
        """What decode is told about `room` (by default the bootstrap address and the room)."""
        host, port = self.bootstrap_address
        return BootstrapInfo(bootstrap_host=host, bootstrap_port=port, bootstrap_room=room)

    def bootstrap_metadata(self) -> dict[str, str]:
        """What decode needs to reach this engine's rooms without asking (announced in the
        instance's discovery metadata): `bootstrap_info` less the room."""
        info = self.bootstrap_info(0)
        metadata = {
            "bootstrap_host": info.bootstrap_host,
            "bootstrap_port": str(info.bootstrap_port),
        }
        if info.outcome_port is not None:
            metadata["outcome_port"] = str(info.outcome_port)
        return metadata

    @abc.abstractmethod
    def open_room(self, room: int | None = None) -> int:
        """Open `room` (chosen by decode), or allocate one, before prefill starts."""

    @abc.abstractmethod
    def abandon_room(self, room: int, reason: str) -> None:
        """Fail a room before prefill ran (e.g. the embeddings could not be read)."""

    @abc.abstractmethod
    async def prefill(
        self, request_id: str, request: GenerateRequest, embeddings: ImageEmbeddings | None
    ) -> None:
        """Run prefill and offer the KV cache in the request's `bootstrap_room` (opened with
        `open_room`); on failure tell the room at once."""


class GeneratingEngine(Engine):
    """What the decode and aggregated roles share: admission."""

    def admit(self, request: GenerateRequest) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold what one request needs to run (KV blocks for its prompt), waiting while they
        are not free.

        The worker enters it before any work for the request starts (prefill, encoding) and
        leaves it once the request is done. Raises a 4xx `ServiceError` for a request that can
        never fit. The default admits everything at once.
        """
        return contextlib.nullcontext()

    def context_length(self) -> int | None:
        """Tokens one sequence may hold, prompt included (``--max-model-len``), known after
        `start`; the worker announces it and the frontend refuses longer requests before they
        travel. None: the engine sets no limit of its own."""
        return None


class DecodeEngine(GeneratingEngine, abc.ABC):
    """Generates from a KV cache received through a bootstrap room."""

    @abc.abstractmethod
    def generate(
        self, request_id: str, request: GenerateRequest, bootstrap: BootstrapInfo
    ) -> AsyncIterator[TokenChunk]:
        """Join the room, receive the cache, and stream tokens (last chunk has finish_reason)."""


class AggregatedEngine(GeneratingEngine, abc.ABC):
    """Prefill and decode in one engine (no KV transfer)."""

    @abc.abstractmethod
    def generate(
        self, request_id: str, request: GenerateRequest, embeddings: ImageEmbeddings | None
    ) -> AsyncIterator[TokenChunk]:
        """Prefill, then stream tokens (last chunk has finish_reason)."""
