"""Admitted requests waiting for their `generate` call, and what ends a request.

The worker enters ``engine.admit(request)`` before any work for the request starts and calls
``engine.generate(..., request, ...)`` inside it, with the same request object: the admission's
sequence (holding the prompt's KV blocks) is found by that object.
"""

import contextlib
from collections.abc import AsyncIterator

from triptych.engines.hf.core import EngineCore
from triptych.engines.hf.sequence import Sequence
from triptych.protocol import ErrorCode, GenerateRequest, ServiceError


def stop_ids(request: GenerateRequest) -> set[int]:
    """Token ids that end a request: its ``stop_token_ids``, and EOS unless ignored."""
    stops = set(request.sampling.stop_token_ids)
    if not request.sampling.ignore_eos:
        stops.update(request.eos_token_ids)
    return stops


class Admissions:
    """The sequences of admitted requests, until their `generate` takes them."""

    def __init__(self) -> None:
        self._held: dict[int, Sequence] = {}

    @contextlib.asynccontextmanager
    async def hold(
        self, core: EngineCore, request: GenerateRequest, block_keys: list[bytes] | None = None
    ) -> AsyncIterator[None]:
        """`core.admission` for the request's prompt (sharing the cached blocks of its prefix
        with `block_keys`), findable by `take(request)` meanwhile."""
        async with core.admission("", len(request.token_ids), block_keys) as sequence:
            self._held[id(request)] = sequence
            try:
                yield
            finally:
                self._held.pop(id(request), None)

    def take(self, request: GenerateRequest) -> Sequence:
        """The admitted request's sequence."""
        sequence = self._held.pop(id(request), None)
        if sequence is None:
            raise ServiceError(ErrorCode.INTERNAL, "generate() called outside admit()")
        return sequence
