"""One thread owns the model: each turn it plans (`Scheduler`), launches (`ModelRunner`), and
only then reads back what the previous turn computed.

So the device always has the next step queued while the host checks stop conditions, emits
tokens and frees blocks: one wait on the device per turn, off the critical path. A sequence that
stopped on a token is seen one step late; the extra token computed for it is dropped.

Every ``STATS_S`` seconds of work the thread logs what it did: decode steps and their mean
batch, tokens per second, KV blocks in use, requests waiting, and how the device's time split
between decode, prefill, KV loads, other model work and idleness (on CUDA from events around each
kind of work). The same device time, the tokens and the queue feed the process's load meter
(`engines.load`), which the worker publishes for the planner.

The asyncio side talks to the thread through `_post` (commands run at the start of a turn) and
gets chunks back through each sequence's sink, one wake-up per event loop per turn.
"""

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch

from triptych.engines.base import Runner
from triptych.engines.grammar import Grammars
from triptych.engines.hf.config import HfConfig
from triptych.engines.hf.model import LanguageModel
from triptych.engines.hf.runner import Launch, ModelRunner
from triptych.engines.hf.scheduler import Admission, Plan, Scheduler
from triptych.engines.hf.sequence import Prompt, Sequence, Sink
from triptych.engines.load import METER, LoadMeter
from triptych.observability import metrics
from triptych.protocol import (
    ErrorCode,
    FinishReason,
    SamplingOptions,
    ServiceError,
    TokenChunk,
    TokenLogprob,
    over_context,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

STATS_S = 10.0
"""How often the model thread logs its statistics while it has work."""


WORK = {"decode": "decode", "load": "decode", "prefill": "prefill", "other": "encode"}
"""The load meter's kind of work for each kind the clock times: KV loads serve decoding, and
the only other work a core runs for its process is an inline vision tower (`call`)."""


class DeviceClock:
    """Device time per kind of work, in milliseconds: from CUDA events recorded around it on
    CUDA; elsewhere from the host's clock, as the work is done when its call returns. Each span,
    once finished, is also busy time of the model in `meter`."""

    def __init__(self, cuda: bool, meter: LoadMeter = METER) -> None:
        self.cuda = cuda
        self.meter = meter
        self._spans: deque[tuple[str, Any, Any]] = deque()
        self.totals: defaultdict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def span(self, kind: str) -> Any:
        """Time the device work queued inside the block."""
        if not self.cuda:
            started = time.perf_counter()
            try:
                yield
            finally:
                self._finished(kind, time.perf_counter() - started)
            return
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        try:
            yield
        finally:
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end.record()
            self._spans.append((kind, start, end))

    def collect(self) -> None:
        """Add up the spans the device has finished (cheap: called every turn)."""
        while self._spans and self._spans[0][2].query():
            kind, start, end = self._spans.popleft()
            self._finished(kind, start.elapsed_time(end) / 1000)

    def _finished(self, kind: str, seconds: float) -> None:
        self.totals[kind] += seconds * 1000
        self.meter.record(WORK[kind], seconds)


class _Stream:
    """A sequence's sink: an asyncio queue on the requester's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()

    def put(self, item: TokenChunk | BaseException) -> None:
        self.queue.put_nowait(item)


class EngineCore:
    """The model thread and the asyncio API around it.

    A decoding core (aggregated and decode workers) owns a paged KV cache: requests are admitted
    by free blocks (`admission`), then `generate` streams their tokens. A prefill-only core
    (prefill workers) runs prompts and returns them packed for transfer (`prefill_only`).
    """

    def __init__(
        self,
        model: LanguageModel,
        config: HfConfig,
        decoding: bool,
        stage: str = "decode",
        meter: LoadMeter = METER,
    ) -> None:
        self.model = model
        self.stage = stage
        self.runner = ModelRunner(model, config, decoding)
        cuda = model.device.type == "cuda"
        self.scheduler = Scheduler(
            self.runner.blocks,
            rows=config.max_running if decoding else 0,
            max_len=self.runner.max_len,
            chunk_tokens=config.chunked_prefill_size,
            prefill_batch=config.prefill_batch if cuda else 1,
        )
        self.runner.capture()
        cache = self.runner.cache
        if cache is not None:
            log.info(
                "%s: KV cache of %d tokens (%d blocks of %d, %.2f GiB; --max-model-len %d)",
                stage,
                cache.capacity_tokens,
                cache.num_blocks - 1,
                cache.block_size,
                cache.capacity_bytes / 2**30,
                self.runner.max_len,
            )
            metrics.KV_CAPACITY.labels(stage).set(cache.capacity_bytes)
            metrics.KV_CAPACITY_TOKENS.labels(stage).set(cache.capacity_tokens)
        self._inbox: deque[Callable[[], None]] = deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._pending: list[Launch] = []
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Sink, Any]]] = {}
        self._admissions: dict[Admission, asyncio.Future[Sequence]] = {}
        """Admissions waiting, with the future their requester awaits."""
        self._packed: dict[Sequence, asyncio.Future[torch.Tensor]] = {}
        """Prefill-only sequences, with the future their requester awaits."""
        self._thread = threading.Thread(target=self._loop, name="model", daemon=True)
        self._grammars: Grammars | None = None
        """Compiled response-format grammars, made on the first request that has one."""
        sched = self.scheduler
        metrics.RUNNING.labels(stage).set_function(lambda: len(sched.running) + len(sched.loading))
        metrics.QUEUE_DEPTH.labels(stage).set_function(self.queue_depth)
        self._meter = meter
        meter.add_queue(self.queue_depth)
        metrics.KV_BYTES.labels(stage).set_function(self._kv_bytes)
        self._clock = DeviceClock(cuda, meter)
        self._stats: Counter[str] = Counter()
        self._stats_since = time.monotonic()
        self._batch_sizes = metrics.BATCH_SIZE.labels(stage)
        self._decoded = metrics.TOKENS_PROCESSED.labels(stage, "decode")
        self._prefilled = metrics.TOKENS_PROCESSED.labels(stage, "prefill")
        self._prefix_queried = metrics.PREFIX_CACHE_QUERIED.labels(stage)
        self._prefix_hits = metrics.PREFIX_CACHE_HITS.labels(stage)

    @property
    def max_len(self) -> int:
        """Tokens one sequence may hold."""
        return self.runner.max_len

    def queue_depth(self) -> int:
        """Requests waiting for the model: for blocks, for prefill, or swapped out."""
        sched = self.scheduler
        return len(sched.waiting) + len(sched.prefilling) + len(sched.swapped)

    def _kv_bytes(self) -> float:
        blocks, cache = self.runner.blocks, self.runner.cache
        if blocks is None or cache is None:
            return 0.0
        return float(blocks.used * cache.block_size * self.model.kv_shape.bytes_per_token)

    # lifecycle

    def start(self) -> None:
        """Start the model thread. Safe to call twice."""
        if not self._thread.is_alive() and not self._stopped:
            if self.model.device.type == "cuda":
                # the model thread shares the GIL with the event loop (and an encoder thread);
                # a shorter switch interval keeps it from waiting 5 ms between decode steps
                sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
            self._thread.start()

    def close(self) -> None:
        """Stop the thread after the current turn. Safe to call twice."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _post(self, command: Callable[[], None]) -> None:
        with self._wake:
            self._inbox.append(command)
            self._wake.notify()

    # the asyncio side

    def check_fits(self, prompt_tokens: int) -> None:
        """A 400 for a prompt that can never run: no room for one generated token."""
        if prompt_tokens >= self.max_len:
            raise over_context(prompt_tokens, self.max_len)
        if not self.scheduler.fits(prompt_tokens):
            raise ServiceError(
                ErrorCode.BAD_REQUEST,
                f"the prompt has {prompt_tokens} tokens, more than this worker's KV cache holds",
            )

    @contextlib.asynccontextmanager
    async def admission(
        self, request_id: str, prompt_tokens: int, block_keys: list[bytes] | None = None
    ) -> AsyncIterator[Sequence]:
        """Hold KV blocks for a prompt of `prompt_tokens` tokens, waiting (first come, first
        served) while they are not free; yields the request's sequence. With the prompt's
        `block_keys` (`models.prefix`), blocks of its longest cached prefix are shared."""
        self.check_fits(prompt_tokens)
        admission = Admission(request_id, prompt_tokens, block_keys or [])
        granted: asyncio.Future[Sequence] = asyncio.get_running_loop().create_future()
        self._admissions[admission] = granted
        self._post(lambda: self.scheduler.waiting.append(admission))
        try:
            sequence = await granted
        except BaseException:
            admission.withdrawn = True  # a grant already on its way lets go of what it brings
            self._admissions.pop(admission, None)
            self._post(lambda: None)
            raise
        try:
            yield sequence
        finally:
            self.release(sequence)

    def release(self, sequence: Sequence) -> None:
        """The request lets go of `sequence`: the model thread frees what it still holds."""
        if not sequence.cancelled:
            sequence.cancelled = True
            self._post(lambda: None)

    async def generate(
        self,
        sequence: Sequence,
        options: SamplingOptions,
        stop_ids: set[int],
        prompt: Prompt,
        received: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> AsyncIterator[TokenChunk]:
        """Run an admitted sequence and yield its chunks, merging any that queued up.

        With `received` (keys and values, hidden state) its prompt was prefilled elsewhere;
        otherwise prefill runs here. Leaving the iteration early lets go of the sequence.
        """
        if options.response_format is not None:
            sequence.grammar = await asyncio.to_thread(self._compile_grammar, options, stop_ids)
        stream = _Stream()
        sequence.options = options
        sequence.stop_ids = frozenset(stop_ids)
        if options.seed is not None:
            sequence.seed = options.seed
        sequence.prompt = prompt
        if received is not None:
            sequence.received, sequence.hidden = received
        sequence.sink = stream
        self._post(lambda: self._submit(sequence))
        try:
            while True:
                item = await stream.queue.get()
                tokens: list[int] = []
                logprobs: list[TokenLogprob] | None = None
                cached_tokens = 0
                while True:
                    if isinstance(item, BaseException):
                        raise item
                    tokens.extend(item.token_ids)
                    if item.logprobs is not None:
                        logprobs = [*(logprobs or []), *item.logprobs]
                    cached_tokens = cached_tokens or item.cached_tokens
                    if item.finish_reason is not None or stream.queue.empty():
                        break
                    item = stream.queue.get_nowait()
                yield TokenChunk(
                    token_ids=tokens,
                    finish_reason=item.finish_reason,
                    cached_tokens=cached_tokens,
                    logprobs=logprobs,
                )
                if item.finish_reason is not None:
                    return
        finally:
            self.release(sequence)

    def _compile_grammar(self, options: SamplingOptions, stop_ids: set[int]) -> Any:
        """A fresh matcher for the request's response format (on a worker thread: compiling a
        large schema takes a while; each schema is compiled once)."""
        assert options.response_format is not None
        if self._grammars is None:
            tokenizer = Path(self.model.path, "tokenizer.json").read_text()
            self._grammars = Grammars(tokenizer, self.model.vocab_size, sorted(stop_ids))
        return self._grammars.compile(options.response_format)

    async def prefill_only(
        self, request_id: str, prompt: Prompt, block_keys: list[bytes] | None = None
    ) -> "Prefilled":
        """Run a prompt on a prefill-only core: its packed cache (`kv_transfer.pack`), its
        M-RoPE offset, and how many of its tokens came from the prefix cache. With the
        prompt's `block_keys`, a cached prefix is not computed again (the packed cache still
        holds every position)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[torch.Tensor] = loop.create_future()
        sequence = Sequence(-1, request_id, len(prompt.token_ids), prompt=prompt)
        sequence.block_keys = block_keys or []
        self._packed[sequence] = done
        self._post(lambda: self._submit(sequence))
        try:
            packed = await done
        finally:
            self.release(sequence)
        return Prefilled(packed, sequence.rope_delta, sequence.cached)

    async def call(self, job: Callable[[], T]) -> T:
        """Run `job` on the model thread (at the start of a turn) and return its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            try:
                with self._clock.span("other"):
                    result = job()
            except BaseException as error:  # delivered to the awaiting coroutine
                loop.call_soon_threadsafe(_settle, future, None, error)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

        self._post(run)
        return await future

    def on_model_thread(self) -> Runner | None:
        """On CUDA, `call`: other model work in this process (a vision tower) then takes turns
        with prefill and decode instead of contending with them for the GIL and the GPU."""
        return self.call if self.model.device.type == "cuda" else None

    # the model thread

    def _submit(self, sequence: Sequence) -> None:
        if sequence.cancelled:
            self.scheduler.finish(sequence)
            return
        sampler = self.runner.sampler
        if sampler is not None and sequence.options is not None and sequence.prompt is not None:
            sampler.start(sequence.row, sequence.options, sequence.prompt.token_ids)
        self.scheduler.submit(sequence)
        if self.runner.config.prefix_cache and sequence.received is None:
            self._prefix_queried.inc(sequence.prompt_len)
            self._prefix_hits.inc(sequence.cached)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopped or self._inbox or self.scheduler.busy or self._pending):
                    self._clock.collect()  # what the last turn ran counts before the thread idles
                    self._wake.wait()
                if self._stopped:
                    return
                commands = list(self._inbox)
                self._inbox.clear()
            for command in commands:
                command()
            try:
                self._turn()
            except Exception as error:
                log.exception(
                    "%s: a model step failed; failing the sequences in flight", self.stage
                )
                self._fail_all(error)
            self._flush()

    def _turn(self) -> None:
        scheduler = self.scheduler
        for sequence in scheduler.reap():
            self.runner.forget(sequence)
            self._settle_packed(sequence, None, asyncio.CancelledError())
        for admission in scheduler.admit():
            self._grant(admission)
        if any(s.grammar is not None for launch in self._pending for s in launch.sequences):
            # a grammar's next mask needs the token just computed: read it before launching
            for launch in self._pending:
                self._deliver(launch)
            self._pending = []
        plan = scheduler.schedule()
        launched = self._launch(plan) if plan else []
        previous, self._pending = self._pending, launched
        for launch in previous:  # the device works on this turn's launches meanwhile
            self._deliver(launch)
        self._clock.collect()
        self._log_stats()

    def _log_stats(self) -> None:
        now = time.monotonic()
        wall = now - self._stats_since
        if wall < STATS_S:
            return
        stats, clock = self._stats, self._clock
        if stats["turns"]:
            busy = {kind: ms / (10 * wall) for kind, ms in clock.totals.items()}
            device = ", ".join(f"{kind} {share:.0f}%" for kind, share in sorted(busy.items()))
            blocks = self.runner.blocks
            log.info(
                "%s: %d decode steps (mean batch %.1f), %.0f tokens/s, %d prompt positions; "
                "KV blocks %s in use (%s cached prefix); %d waiting%s",
                self.stage,
                stats["steps"],
                stats["rows"] / max(stats["steps"], 1),
                stats["tokens"] / wall,
                stats["prefilled"],
                f"{blocks.used}/{blocks.capacity}" if blocks is not None else "-",
                blocks.cached if blocks is not None else "-",
                len(self.scheduler.waiting) + len(self.scheduler.prefilling),
                f"; device: {device}, idle {max(0.0, 100 - sum(busy.values())):.0f}%",
            )
        clock.totals.clear()
        self._stats = Counter()
        self._stats_since = now

    def _launch(self, plan: Plan) -> list[Launch]:
        runner, scheduler = self.runner, self.scheduler
        launched: list[Launch] = []
        if plan.preempt:
            with self._clock.span("load"):
                runner.swap_out(plan.preempt)
        self._stats["turns"] += 1
        if plan.decode:
            try:
                with self._clock.span("decode"):
                    launched.append(runner.decode(plan.decode))
            except Exception as error:
                log.exception("%s: decode step failed; failing the batch", self.stage)
                self._fail(plan.decode, error)
            else:
                self._batch_sizes.observe(len(plan.decode))
                self._stats["steps"] += 1
                self._stats["rows"] += len(plan.decode)
        if plan.loads:
            try:
                with self._clock.span("load"):
                    launch = runner.load(plan.loads)
            except Exception as error:
                log.exception("%s: loading KV caches failed", self.stage)
                self._fail(plan.loads, error)
            else:
                launched.extend([launch] if launch is not None else [])
                for sequence in plan.loads:
                    scheduler.start_running(sequence)
        if plan.prefill:
            sequences = [chunk.sequence for chunk in plan.prefill]
            positions = sum(chunk.end - chunk.sequence.prefilled for chunk in plan.prefill)
            try:
                with self._clock.span("prefill"):
                    launch, packed = runner.prefill(plan.prefill)
            except Exception as error:
                log.exception("%s: prefill failed", self.stage)
                self._fail(sequences, error)
            else:
                self._prefilled.inc(positions)
                self._stats["prefilled"] += positions
                self._meter.count("prompt_tokens", positions)
                launched.extend([launch] if launch is not None else [])
                for chunk in plan.prefill:
                    if chunk.last and runner.decoding:
                        scheduler.start_running(chunk.sequence)
                for sequence, tensor in packed:
                    self._settle_packed(sequence, tensor, None)
                    scheduler.finish(sequence)
        return launched

    def _grant(self, admission: Admission) -> None:
        future = self._admissions.pop(admission, None)
        sequence = admission.granted
        assert sequence is not None
        if future is None:  # its requester gave up
            self.scheduler.finish(sequence)
            return
        grant = _Grant(future, sequence, lambda: self._post(lambda: None))
        self._outbox.setdefault(grant.loop, []).append((grant, None))

    def _deliver(self, launch: Launch) -> None:
        """Read a launch's tokens; emit them, checking stop conditions, and free what ended."""
        tokens = launch.values()
        self._decoded.inc(len(tokens))
        self._stats["tokens"] += len(tokens)
        emitted = 0
        for i, (sequence, token) in enumerate(zip(launch.sequences, tokens, strict=True)):
            if sequence.done:
                continue
            emitted += 1
            sequence.output.append(token)
            try:
                reason = self._finish_reason(sequence, token)
            except ServiceError as error:
                self._fail([sequence], error)
                continue
            first = len(sequence.output) == 1
            top = sequence.options.logprobs if sequence.options is not None else None
            self._emit(
                sequence,
                TokenChunk(
                    token_ids=[token],
                    finish_reason=reason,
                    cached_tokens=sequence.cached if first else 0,
                    logprobs=None if top is None else [launch.logprob(i, top)],
                ),
            )
            if reason is not None:
                sequence.finish_reason = reason
                self.scheduler.finish(sequence)
        self._meter.count("output_tokens", emitted)  # not the extra tokens of stopped ones

    def _finish_reason(self, sequence: Sequence, token: int) -> FinishReason | None:
        options = sequence.options
        assert options is not None
        count = len(sequence.output)
        if token in sequence.stop_ids and count > options.min_tokens:
            return "stop"
        matcher = sequence.grammar
        if matcher is not None:
            if not matcher.consume_token(token):
                raise ServiceError(
                    ErrorCode.INTERNAL, f"response_format grammar failed: {matcher.get_error()}"
                )
            if matcher.is_stopped():
                return "stop"  # the JSON is complete and nothing may follow it
        if count >= options.max_tokens or sequence.prompt_len + count - 1 >= self.max_len:
            return "length"  # asked for, or the sequence fills --max-model-len
        return None

    def _emit(self, sequence: Sequence, item: TokenChunk | BaseException) -> None:
        if sequence.sink is not None:
            self._outbox.setdefault(sequence.sink.loop, []).append((sequence.sink, item))

    def _flush(self) -> None:
        """Hand every event loop what this turn produced for it, in one wake-up each."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
                loop.call_soon_threadsafe(_put_all, items)

    def _fail(self, sequences: list[Sequence], error: BaseException) -> None:
        for sequence in sequences:
            self._emit(sequence, error)
            self._settle_packed(sequence, None, error)
            self.runner.forget(sequence)
            self.scheduler.finish(sequence)

    def _fail_all(self, error: BaseException) -> None:
        scheduler = self.scheduler
        self._pending = []
        self._fail(
            [
                *scheduler.prefilling,
                *scheduler.loading,
                *scheduler.running,
                *scheduler.swapped,
            ],
            error,
        )

    def _settle_packed(
        self, sequence: Sequence, packed: torch.Tensor | None, error: BaseException | None
    ) -> None:
        future = self._packed.pop(sequence, None)
        if future is not None:
            future.get_loop().call_soon_threadsafe(_settle, future, packed, error)


class Prefilled(NamedTuple):
    """A prompt run by a prefill-only core."""

    packed: torch.Tensor
    """Keys, values and last hidden state, packed for transfer (`kv_transfer.pack`)."""
    rope_delta: int
    cached: int
    """Prompt tokens taken from the prefix cache."""


class _Grant:
    """Resolves an admission's future on its loop (or lets go of the sequence if nobody waits
    for it any more)."""

    def __init__(
        self, future: "asyncio.Future[Sequence]", sequence: Sequence, nudge: Callable[[], None]
    ) -> None:
        self.loop = future.get_loop()
        self.future = future
        self.sequence = sequence
        self.nudge = nudge

    def put(self, _: object) -> None:
        if self.future.done():
            self.sequence.cancelled = True
            self.nudge()
        else:
            self.future.set_result(self.sequence)


def _put_all(items: list[tuple[Any, Any]]) -> None:
    for sink, item in items:
        sink.put(item)


async def load_core(
    model_path: str, device: str, config: HfConfig, decoding: bool, stage: str
) -> EngineCore:
    """Load the model, size its KV cache, capture its graphs, and start its thread."""

    def build() -> EngineCore:
        return EngineCore(LanguageModel(model_path, device), config, decoding, stage)

    core = await asyncio.to_thread(build)
    core.start()
    return core


def _settle(future: "asyncio.Future[Any]", result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
