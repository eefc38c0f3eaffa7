"""The choices of one HTTP request: ``n`` (times the prompts) generations, run side by side.

Each choice is its own pipeline request (its own `Generation`, so each may migrate on its
own). Nothing reaches the client until every choice produced its first chunk: until then a
failure is still a plain HTTP error. Afterwards their chunks come out merged, in arrival order,
each tagged with its choice's index.
"""

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence

from triptych.components.frontend.migration import Generation
from triptych.components.frontend.telemetry import RequestTelemetry
from triptych.protocol import GenerateRequest, TokenChunk
from triptych.runtime import Client, Runtime

_DONE = None


class Choices:
    """Starts, streams and cancels the generations behind one request."""

    def __init__(
        self,
        runtime: Runtime,
        entry: Client,
        requests: list[GenerateRequest],
        request_id: str,
        telemetry: RequestTelemetry,
        *,
        deadline: float,
        migration_limit: int,
        affinity: Sequence[Sequence[str]] = (),
    ) -> None:
        """`affinity`: per request, the content keys its entry instance is picked by (none:
        round-robin)."""
        self.generations = [
            Generation(
                runtime,
                entry,
                request,
                request_id if index == 0 else f"{request_id}.n{index}",
                deadline=deadline,
                migration_limit=migration_limit,
                affinity=affinity[index] if index < len(affinity) else (),
            )
            for index, request in enumerate(requests)
        ]
        self._prompts = [tuple(request.token_ids) for request in requests]
        self._telemetry = telemetry
        self._streams: dict[int, AsyncGenerator[TokenChunk]] = {}
        self._firsts: list[TokenChunk] = []
        self._pumps: list[asyncio.Task[None]] = []
        self._merged: asyncio.Queue[tuple[int, TokenChunk | BaseException | None]] | None = None

    def __len__(self) -> int:
        return len(self.generations)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from prefix caches, as the first chunks tell, each prompt
        counted once (as the usage counts prompts)."""
        best: dict[tuple[int, ...], int] = {}
        for prompt, first in zip(self._prompts, self._firsts, strict=False):
            best[prompt] = max(best.get(prompt, 0), first.cached_tokens)
        return sum(best.values())

    async def start(self) -> None:
        """Hand every choice to an entry instance and wait for each one's first chunk; the
        first failure is raised (then `close` cancels the rest)."""
        if len(self.generations) == 1:
            self._firsts = [await self._first(0)]
            return
        try:
            async with asyncio.TaskGroup() as group:
                starts = [group.create_task(self._first(i)) for i in range(len(self))]
        except BaseExceptionGroup as failures:
            raise _first_error(failures) from None
        self._firsts = [task.result() for task in starts]

    async def _first(self, index: int) -> TokenChunk:
        generation = self.generations[index]
        await generation.start()
        self._streams[index] = generation.chunks()
        return await anext(self._streams[index])

    def pending(self) -> bool:
        """Whether another event is already here (the reader may hold its write for it)."""
        if self._merged is not None and not self._merged.empty():
            return True
        return any(generation.pending for generation in self.generations)

    async def events(self) -> AsyncGenerator[tuple[int, TokenChunk]]:
        """``(choice index, chunk)`` as they arrive, the first chunks first."""
        for index, first in enumerate(self._firsts):
            self._telemetry.chunk(len(first.token_ids))
            yield index, first
        if len(self) == 1:
            async for chunk in self._streams[0]:
                self._telemetry.chunk(len(chunk.token_ids))
                yield 0, chunk
            return
        queue: asyncio.Queue[tuple[int, TokenChunk | BaseException | None]] = asyncio.Queue()
        self._merged = queue
        self._pumps = [asyncio.create_task(self._pump(i, queue)) for i in range(len(self))]
        remaining = len(self._pumps)
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                self._telemetry.chunk(len(item.token_ids))
                yield index, item

    async def _pump(
        self, index: int, queue: "asyncio.Queue[tuple[int, TokenChunk | BaseException | None]]"
    ) -> None:
        try:
            async for chunk in self._streams[index]:
                queue.put_nowait((index, chunk))
        except Exception as error:  # handed to the consumer, which ends the response
            queue.put_nowait((index, error))
        finally:
            queue.put_nowait((index, _DONE))

    async def finish(self, index: int) -> None:
        """Stop choice `index` early (a stop string matched): its stages free what they hold."""
        if index < len(self._pumps):
            pump = self._pumps[index]
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        await self.generations[index].close()

    async def close(self) -> None:
        """Cancel whatever still runs. Safe to call twice."""
        for pump in self._pumps:
            pump.cancel()
        for pump in self._pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        for stream in self._streams.values():
            await stream.aclose()
        for generation in self.generations:
            await generation.close()


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    errors = list(group.exceptions)
    while errors and isinstance(errors[0], BaseExceptionGroup):
        errors = list(errors[0].exceptions)
    return errors[0]
