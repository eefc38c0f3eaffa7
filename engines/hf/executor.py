"""One thread owns the model: it runs queued jobs (prefills) between batched decode steps.

The asyncio side submits prefill jobs and hands over sequences to decode; the thread emits
token chunks back onto the event loop. One prefill runs between two decode steps, so running
requests keep streaming while new ones are admitted.
"""

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from triptych.engines.hf.model import LanguageModel, SequenceKV
from triptych.engines.hf.sampler import Sampler
from triptych.observability import metrics
from triptych.protocol import TokenChunk

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(eq=False)
class Running:
    """A sequence in the decode batch."""

    request_id: str
    kv: SequenceKV
    sampler: Sampler
    hidden: torch.Tensor | None
    """The last prompt position's hidden state, until the first token is sampled."""
    emit: Callable[[TokenChunk | BaseException], None]
    """Called on the model thread with each chunk (the last has a finish reason), or with the
    error that ended the sequence."""
    prompt_tokens: int = 0
    cancelled: bool = False
    last_token: int = field(default=-1)


class ModelExecutor:
    """Serializes all work on one model; decode steps batch every running sequence."""

    def __init__(self, model: LanguageModel, max_batch: int = 32, stage: str = "decode") -> None:
        self.model = model
        self.max_batch = max_batch
        self.stage = stage
        self._jobs: deque[Callable[[], None]] = deque()
        self._admitted: deque[Running] = deque()
        self._running: list[Running] = []
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="model", daemon=True)
        metrics.RUNNING.labels(stage).set_function(lambda: self.running)
        metrics.QUEUE_DEPTH.labels(stage).set_function(
            lambda: len(self._jobs) + len(self._admitted)
        )
        metrics.KV_BYTES.labels(stage).set_function(self._kv_bytes)

    def _kv_bytes(self) -> float:
        return float(
            sum(
                keys.numel() * keys.element_size() * 2
                for sequence in list(self._running)
                for keys, _ in sequence.kv.kv
            )
        )

    def start(self) -> None:
        """Start the model thread. Safe to call twice."""
        if not self._thread.is_alive() and not self._stopped:
            self._thread.start()

    def close(self) -> None:
        """Stop the thread after the current step. Safe to call twice."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def running(self) -> int:
        """Sequences decoding now."""
        return len(self._running) + len(self._admitted)

    async def call(self, job: Callable[[], T]) -> T:
        """Run `job` on the model thread and return its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            try:
                result = job()
            except BaseException as error:  # delivered to the awaiting coroutine
                loop.call_soon_threadsafe(_settle, future, None, error)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

        with self._wake:
            self._jobs.append(run)
            self._wake.notify()
        return await future

    def add(self, sequence: Running) -> None:
        """Join the decode batch."""
        with self._wake:
            self._admitted.append(sequence)
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopped or self._jobs or self._admitted or self._running):
                    self._wake.wait()
                if self._stopped:
                    return
                job = self._jobs.popleft() if self._jobs else None
                while self._admitted and len(self._running) < self.max_batch:
                    self._running.append(self._admitted.popleft())
            if job is not None:
                job()
            if self._running:
                try:
                    self._step()
                except Exception as error:
                    log.exception("decode step failed; failing the batch")
                    for sequence in self._running:
                        sequence.emit(error)
                    self._running.clear()

    def _step(self) -> None:
        self._running = [s for s in self._running if not s.cancelled]
        fresh = [s for s in self._running if s.hidden is not None]
        ongoing = [s for s in self._running if s.hidden is None]
        hidden_rows: list[torch.Tensor] = []
        order: list[Running] = []
        if fresh:
            hidden_rows.append(torch.stack([s.hidden for s in fresh if s.hidden is not None]))
            order.extend(fresh)
            for s in fresh:
                s.hidden = None
        if ongoing:
            hidden_rows.append(
                self.model.decode([s.last_token for s in ongoing], [s.kv for s in ongoing])
            )
            order.extend(ongoing)
        if not order:
            return
        logits = self.model.logits(torch.cat(hidden_rows))
        metrics.BATCH_SIZE.labels(self.stage).observe(len(order))
        metrics.TOKENS_PROCESSED.labels(self.stage, "decode").inc(len(order))
        done: list[Running] = []
        for row, sequence in zip(logits, order, strict=True):
            token = sequence.sampler.next_token(row)
            sequence.last_token = token
            reason = sequence.sampler.finished()
            first = len(sequence.sampler.generated) == 1
            sequence.emit(
                TokenChunk(
                    token_ids=[token],
                    finish_reason=reason,
                    prompt_tokens=sequence.prompt_tokens if first else 0,
                )
            )
            if reason is not None:
                done.append(sequence)
        if done:
            self._running = [s for s in self._running if s not in done]


def _settle(future: "asyncio.Future[Any]", result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
