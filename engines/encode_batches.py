"""Encode requests that arrive together share one vision forward: the queue both encode
engines (``hf``, ``sglang``) batch their requests through."""

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from triptych.protocol import MediaItem, ServiceError
from triptych.transfer import ImageEmbeddings


def _future() -> "asyncio.Future[ImageEmbeddings]":
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class EncodeJob:
    """One request's images (and videos), in prompt order, waiting for their embeddings."""

    images: Sequence[MediaItem]
    future: "asyncio.Future[ImageEmbeddings]" = field(default_factory=_future)

    def fail(self, error: ServiceError) -> None:
        """Fail the request (unless it was cancelled or answered already)."""
        if not self.future.done():
            self.future.set_exception(error)


Job = TypeVar("Job", bound=EncodeJob)


class EncodeBatches(Generic[Job]):
    """Jobs wait here; `run` takes them in arrival order, in batches of at most `max_images`
    images (a larger job runs alone), one batch at a time."""

    def __init__(
        self, run: Callable[[list[Job]], Awaitable[None]], max_images: int, name: str
    ) -> None:
        self._run = run
        self.max_images = max_images
        self.name = name
        self.pending: list[Job] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin taking batches. Safe to call twice."""
        if self._task is None:
            self._task = asyncio.create_task(self._batches(), name=self.name)

    async def submit(self, job: Job) -> ImageEmbeddings:
        """Queue `job` and wait for its embeddings."""
        self.pending.append(job)
        self._wake.set()
        return await job.future

    async def close(self) -> None:
        """Stop, and cancel the jobs still waiting. Safe to call twice."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for job in self.pending:
            job.future.cancel()
        self.pending.clear()

    async def _batches(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch: list[Job] = []
            count = 0
            while self.pending and (
                not batch or count + len(self.pending[0].images) <= self.max_images
            ):
                job = self.pending.pop(0)
                if not job.future.done():  # else cancelled while waiting
                    batch.append(job)
                    count += len(job.images)
            if self.pending:
                self._wake.set()
            if batch:
                await self._run(batch)
