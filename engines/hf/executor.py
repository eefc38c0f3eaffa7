"""One thread owns the model: it runs queued jobs (prefills) between batched decode steps.

The asyncio side reserves a KV slot (waiting in a queue while none is free), submits the
prefill (on CUDA, prefills queued together run as one padded batch), and hands the prefilled
sequence over; the model thread copies its cache into
the slot, samples its first token from the prompt's last hidden state and adds it to the decode
batch. One job runs between two decode steps, so running requests keep streaming while new ones
are admitted. Token chunks go back to the event loop through each sequence's `emit`.
"""

import asyncio
import contextlib
import logging
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch

from triptych.engines.base import Runner
from triptych.engines.hf.decoder import Decoder
from triptych.engines.hf.kv_cache import KVBudget, KVPool
from triptych.engines.hf.model import LanguageModel, Prompt, SequenceKV
from triptych.engines.hf.sampler import Sampler
from triptych.engines.load import METER
from triptych.observability import metrics
from triptych.protocol import ErrorCode, ServiceError, TokenChunk

log = logging.getLogger(__name__)
T = TypeVar("T")


DEFAULT_MAX_LEN = 8192
"""The slot length when neither ``--max-model-len`` nor a shorter model context sets it."""


@dataclass(frozen=True)
class Decoding:
    """How an executor decodes: its KV cache budget and whether it replays CUDA graphs."""

    budget: KVBudget = field(default_factory=lambda: KVBudget(max_len=0))
    """``max_len`` 0 means the model's context length, at most `DEFAULT_MAX_LEN`."""
    cuda_graphs: bool = True


PREFILL_BATCH = 8
"""By default at most this many prompts share a prefill forward (CUDA only)."""
PREFILL_BATCH_TOKENS = 8192
"""...and at most this many padded positions."""


@dataclass(eq=False)
class _Prefill:
    prompt: Prompt
    future: "asyncio.Future[tuple[SequenceKV, torch.Tensor]]"
    loop: asyncio.AbstractEventLoop


@dataclass(eq=False)
class Running:
    """A sequence on its way into, or in, the decode batch."""

    request_id: str
    sampler: Sampler
    emit: Callable[[TokenChunk | BaseException], None]
    """Called on the model thread with each chunk (the last has a finish reason), or with the
    error that ended the sequence."""
    prefilled: SequenceKV | None
    """The prompt's KV cache, until it is copied into a slot."""
    hidden: torch.Tensor | None
    """The last prompt position's hidden state, until the first token is sampled."""
    prompt_tokens: int = 0
    rope_delta: int = 0
    slot: int = -1
    length: int = 0
    """Tokens in the slot's KV cache."""
    last_token: int = -1
    cancelled: bool = False


class ModelExecutor:
    """Serializes all work on one model; decode steps batch every running sequence.

    With `decoding` settings the executor owns a static KV pool (and its CUDA graphs) and
    decodes; without them it only runs jobs (a prefill worker).
    """

    def __init__(
        self,
        model: LanguageModel,
        decoding: Decoding | None = None,
        stage: str = "decode",
        prefill_batch: int = PREFILL_BATCH,
    ) -> None:
        self.model = model
        self.stage = stage
        self.prefill_batch = max(1, prefill_batch)
        self.budget: KVBudget | None = None
        self.decoder: Decoder | None = None
        self.slots = 0
        if decoding is not None:
            budget = decoding.budget
            if not budget.max_len:
                budget = replace(budget, max_len=min(model.context_length, DEFAULT_MAX_LEN))
            if budget.max_len > model.context_length:
                raise ValueError(
                    f"--max-model-len {budget.max_len} exceeds the model's context length "
                    f"({model.context_length})"
                )
            self.budget = budget
            self.slots = budget.slots(model.kv_shape, model.device)
            pool = KVPool(model.kv_shape, self.slots, budget.max_len, model.device)
            self.decoder = Decoder(model, pool, decoding.cuda_graphs)
            self.decoder.capture()
            log.info(
                "%s: KV cache of %d slots x %d tokens (%.2f GiB)",
                stage,
                self.slots,
                budget.max_len,
                pool.capacity_bytes / 2**30,
            )
            metrics.KV_CAPACITY.labels(stage).set(pool.capacity_bytes)
        self._free_slots = asyncio.Semaphore(self.slots)
        self._waiting = 0
        self._jobs: deque[Callable[[], None]] = deque()
        self._prefills: deque[_Prefill] = deque()
        self._admitted: deque[Running] = deque()
        self._running: list[Running] = []
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="model", daemon=True)
        metrics.RUNNING.labels(stage).set_function(lambda: self.running)
        metrics.QUEUE_DEPTH.labels(stage).set_function(self.queue_depth)
        METER.add_queue(self.queue_depth)
        metrics.KV_BYTES.labels(stage).set_function(self._kv_bytes)
        self._batch_sizes = metrics.BATCH_SIZE.labels(stage)  # looked up once: per-step metrics
        self._decoded = metrics.TOKENS_PROCESSED.labels(stage, "decode")

    def queue_depth(self) -> int:
        """Work waiting for the model thread: jobs, prefills, requests waiting for a slot."""
        return len(self._jobs) + len(self._prefills) + len(self._admitted) + self._waiting

    @property
    def max_len(self) -> int:
        """Tokens one sequence may hold (0 when this executor does not decode)."""
        return self.budget.max_len if self.budget is not None else 0

    def _kv_bytes(self) -> float:
        per_token = self.model.kv_shape.bytes_per_token
        return float(sum(s.length for s in list(self._running)) * per_token)

    def start(self) -> None:
        """Start the model thread. Safe to call twice."""
        if not self._thread.is_alive() and not self._stopped:
            if self.model.device.type == "cuda":
                # the model thread shares the GIL with the event loop (and an encoder thread);
                # a shorter switch interval keeps it from waiting 5 ms between decode steps
                sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
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
        """Sequences decoding now or about to."""
        return len(self._running) + len(self._admitted)

    def check_fits(self, prompt_tokens: int) -> None:
        """A 400 for a prompt that cannot fit a slot with room for one generated token."""
        if prompt_tokens >= self.max_len:
            raise ServiceError(
                ErrorCode.BAD_REQUEST,
                f"the prompt has {prompt_tokens} tokens; this model serves at most "
                f"{self.max_len - 1} (--max-model-len {self.max_len}, one token kept to generate)",
            )

    @contextlib.asynccontextmanager
    async def reservation(self, prompt_tokens: int) -> AsyncIterator[None]:
        """Hold a KV slot for one request; waits in a queue while every slot is taken."""
        self.check_fits(prompt_tokens)
        self._waiting += 1
        try:
            await self._free_slots.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._free_slots.release()

    async def prefill(self, prompt: Prompt) -> tuple[SequenceKV, torch.Tensor]:
        """Prefill on the model thread; on CUDA, prompts queued together share one forward."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[SequenceKV, torch.Tensor]] = loop.create_future()
        with self._wake:
            self._prefills.append(_Prefill(prompt, future, loop))
            self._wake.notify()
        return await future

    def _take_prefills(self) -> list["_Prefill"]:
        """The prefills to run next: one, or on CUDA up to `prefill_batch` of them."""
        taken = [self._prefills.popleft()] if self._prefills else []
        limit = self.prefill_batch if self.model.device.type == "cuda" else 1
        while self._prefills and len(taken) < limit:
            longest = max(len(p.prompt[0]) for p in [*taken, self._prefills[0]])
            if longest * (len(taken) + 1) > PREFILL_BATCH_TOKENS:
                break
            taken.append(self._prefills.popleft())
        return taken

    def _run_prefills(self, batch: list["_Prefill"]) -> None:
        batch = [p for p in batch if not p.future.cancelled()]
        if not batch:
            return
        try:
            results = self.model.prefill_batch([p.prompt for p in batch])
        except BaseException as error:  # delivered to every awaiting coroutine
            for p in batch:
                p.loop.call_soon_threadsafe(_settle, p.future, None, error)
            return
        METER.count("prompt_tokens", sum(len(p.prompt[0]) for p in batch))
        for p, result in zip(batch, results, strict=True):
            p.loop.call_soon_threadsafe(_settle, p.future, result, None)

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

    def runner(self) -> Runner | None:
        """On CUDA, `call`: other model work in this process (a vision tower) then takes turns
        with prefill and decode instead of contending with them for the GIL and the GPU."""
        return self.call if self.model.device.type == "cuda" else None

    def add(self, sequence: Running) -> None:
        """Join the decode batch (the caller holds a `reservation`)."""
        if self.decoder is None:
            raise RuntimeError("this executor does not decode")
        with self._wake:
            self._admitted.append(sequence)
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (
                    self._stopped or self._jobs or self._prefills or self._admitted or self._running
                ):
                    self._wake.wait()
                if self._stopped:
                    return
                job = self._jobs.popleft() if self._jobs else None
                prefills = self._take_prefills()
                fresh: list[Running] = []
                while self._admitted and len(self._running) + len(fresh) < self.slots:
                    fresh.append(self._admitted.popleft())
            if job is not None:
                with METER.busy("encode"):  # other model work: an inline vision tower
                    job()
            if prefills:
                with METER.busy("prefill"):
                    self._run_prefills(prefills)
            try:
                if fresh or self._running:
                    with METER.busy("decode"):
                        if fresh:
                            self._admit(fresh)
                        if self._running:
                            self._step()
            except Exception as error:
                log.exception("decode step failed; failing the batch")
                for sequence in self._running + fresh:
                    sequence.emit(error)
                self._running.clear()

    def _admit(self, fresh: list[Running]) -> None:
        """Sample each new sequence's first token; those that go on get a slot."""
        assert self.decoder is not None
        fresh = [s for s in fresh if not s.cancelled]
        if not fresh:
            return
        logits = self.model.logits(torch.stack([s.hidden for s in fresh if s.hidden is not None]))
        for sequence in fresh:
            assert sequence.prefilled is not None
            sequence.length = sequence.prefilled.length
            sequence.rope_delta = sequence.prefilled.rope_delta
        done = self._choose(fresh, logits, logits.argmax(-1))
        for sequence in fresh:
            if sequence not in done:
                assert sequence.prefilled is not None
                sequence.slot = len(self._running)
                self.decoder.pool.load(sequence.slot, sequence.prefilled.kv)
                self._running.append(sequence)
            sequence.prefilled, sequence.hidden = None, None

    def _step(self) -> None:
        assert self.decoder is not None
        self._compact(set())
        batch = self._running
        if not batch:
            return
        logits, argmax = self.decoder.step(
            [s.last_token for s in batch],
            [s.length + s.rope_delta for s in batch],
            [s.length for s in batch],
        )
        for sequence in batch:
            sequence.length += 1
        self._batch_sizes.observe(len(batch))
        done = self._choose(batch, logits, argmax)
        if done:
            self._compact(done)

    def _choose(
        self, batch: list[Running], logits: torch.Tensor, argmax: torch.Tensor
    ) -> set[Running]:
        """Sample and emit each sequence's next token; returns those that finished."""
        plain = [s.sampler.takes_argmax() for s in batch]
        picked = argmax.tolist() if any(plain) else []
        self._decoded.inc(len(batch))
        METER.count("output_tokens", len(batch))
        done: set[Running] = set()
        for row, sequence in enumerate(batch):
            sampler = sequence.sampler
            token = sampler.accept(picked[row]) if plain[row] else sampler.next_token(logits[row])
            sequence.last_token = token
            reason = sampler.finished()
            if reason is None and sequence.length >= self.max_len:
                reason = "length"  # the slot is full
            first = len(sampler.generated) == 1
            sequence.emit(
                TokenChunk(
                    token_ids=[token],
                    finish_reason=reason,
                    prompt_tokens=sequence.prompt_tokens if first else 0,
                )
            )
            if reason is not None:
                done.add(sequence)
        return done

    def _compact(self, done: set[Running]) -> None:
        """Drop finished and cancelled sequences; move the rest down to slots ``0..n-1``."""
        assert self.decoder is not None
        survivors = [s for s in self._running if not (s.cancelled or s in done)]
        if len(survivors) == len(self._running):
            return
        for index, sequence in enumerate(survivors):
            if sequence.slot != index:  # slots only move down, in order: no overwrite
                self.decoder.pool.move(sequence.slot, index, sequence.length)
                sequence.slot = index
        self._running = survivors


async def load_executor(
    model_path: str,
    device: str,
    decoding: Decoding | None,
    stage: str,
    prefill_batch: int = PREFILL_BATCH,
) -> ModelExecutor:
    """Load the model, size its KV cache, capture its graphs, and start its thread."""

    def build() -> ModelExecutor:
        return ModelExecutor(LanguageModel(model_path, device), decoding, stage, prefill_batch)

    executor = await asyncio.to_thread(build)
    executor.start()
    return executor


def _settle(future: "asyncio.Future[Any]", result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
