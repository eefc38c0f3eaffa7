"""What runs next: admission by free KV blocks, chunked prefill, the decode batch, preemption.

Each model-thread iteration asks for a `Plan`: caches to load (received from a prefill worker,
or coming back from host memory), one prefill step, and one decode step for every running
sequence.

- Admission: a request waits (first come, first served) until a sequence row is free and its
  prompt fits in free blocks with one block left per live sequence (room to grow); then it holds
  those blocks until it ends. A prompt longer than the cache could ever hold is refused. With
  its block keys, the blocks of its longest cached prefix are shared rather than taken, and its
  prefill starts after them (a prefill-only sequence shares them when it is submitted).
- Prefill: at most ``chunk_tokens`` positions per step, so a running decode batch waits for one
  chunk at most. Whole prompts that fit share a step (up to ``prefill_batch`` of them, padded
  length counted); a longer one runs alone, a chunk per step, on top of its earlier chunks.
- Decode: every running sequence that may still generate, each with a block for the position
  it writes. When blocks run out, the most recently started sequence is preempted: its cache
  goes to host memory and comes back when blocks are free, before anything new is admitted.
"""

from collections import deque
from dataclasses import dataclass, field

from triptych.engines.hf.block_manager import BlockManager
from triptych.engines.hf.sequence import Sequence, Status


@dataclass
class Chunk:
    """Prompt positions ``sequence.prefilled..end-1`` to run."""

    sequence: Sequence
    end: int

    @property
    def last(self) -> bool:
        """Whether it completes the prompt."""
        return self.end == self.sequence.prompt_len


@dataclass
class Plan:
    """One iteration's work."""

    loads: list[Sequence] = field(default_factory=list)
    prefill: list[Chunk] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    preempt: list[Sequence] = field(default_factory=list)
    """Sequences whose caches go to host memory before anything else runs."""

    def __bool__(self) -> bool:
        return bool(self.loads or self.prefill or self.decode or self.preempt)


@dataclass(eq=False)
class Admission:
    """A request waiting for blocks for its prompt."""

    request_id: str
    prompt_len: int
    block_keys: list[bytes] = field(default_factory=list)
    """Keys of the prompt's full blocks, when prefix caching is on."""
    granted: Sequence | None = None
    withdrawn: bool = False


class Scheduler:
    """Owns the sequences' lifecycles; touched by the model thread only."""

    def __init__(
        self,
        blocks: BlockManager | None,
        rows: int,
        max_len: int,
        chunk_tokens: int,
        prefill_batch: int,
    ) -> None:
        self.blocks = blocks
        """None for a prefill-only engine (its caches leave with the request)."""
        self.max_len = max_len
        self.chunk_tokens = max(1, chunk_tokens)
        self.prefill_batch = max(1, prefill_batch)
        self._free_rows: deque[int] = deque(range(rows))
        self.waiting: deque[Admission] = deque()
        self.admitted: list[Sequence] = []
        """Holding blocks, input not yet here."""
        self.prefilling: deque[Sequence] = deque()
        self.loading: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()

    @property
    def alive(self) -> int:
        """Sequences holding a row."""
        return (
            len(self.admitted)
            + len(self.prefilling)
            + len(self.loading)
            + len(self.running)
            + len(self.swapped)
        )

    @property
    def busy(self) -> bool:
        """Whether anything can run now (admissions waiting for room do not count)."""
        return bool(self.prefilling or self.loading or self.running or self.swapped)

    def fits(self, prompt_len: int) -> bool:
        """Whether a prompt could ever be admitted (the whole cache free)."""
        return self.blocks is None or self.blocks.blocks_for(prompt_len + 1) <= self.blocks.capacity

    # lifecycle

    def admit(self) -> list[Admission]:
        """Grant waiting admissions while rows and blocks allow (none while preempted
        sequences wait to come back); returns those granted."""
        granted = []
        while self.waiting and not self.swapped and self._free_rows:
            admission = self.waiting[0]
            if admission.withdrawn:
                self.waiting.popleft()
                continue
            shared = self._cached_prefix(admission.prompt_len, admission.block_keys)
            if self.blocks is not None and not self.blocks.can_allocate(
                admission.prompt_len + 1, headroom=self.alive, shared=shared
            ):
                break
            self.waiting.popleft()
            sequence = Sequence(
                self._free_rows.popleft(), admission.request_id, admission.prompt_len
            )
            sequence.block_keys = admission.block_keys
            if self.blocks is not None:
                self._share(sequence, shared)
                self.blocks.allocate(sequence.block_table, admission.prompt_len)
            self.admitted.append(sequence)
            admission.granted = sequence
            granted.append(admission)
        return granted

    def _cached_prefix(self, prompt_len: int, keys: list[bytes]) -> list[int]:
        """Cached blocks of the prompt's longest cached prefix, leaving at least its last
        token to compute (its logits start generation)."""
        if self.blocks is None or not keys:
            return []
        return self.blocks.match(keys[: (prompt_len - 1) // self.blocks.block_size])

    def _share(self, sequence: Sequence, shared: list[int]) -> None:
        assert self.blocks is not None
        self.blocks.share(sequence.block_table, shared)
        sequence.cached = sequence.prefilled = len(shared) * self.blocks.block_size

    def submit(self, sequence: Sequence) -> None:
        """Its input is here: a prompt to prefill, or a received cache to load."""
        if sequence in self.admitted:
            self.admitted.remove(sequence)
        elif (
            sequence.row < 0
            and self.blocks is not None
            and sequence.block_keys
            and not sequence.block_table
        ):
            # a prefill-only sequence holds no blocks but those of its cached prefix
            self._share(sequence, self._cached_prefix(sequence.prompt_len, sequence.block_keys))
        if sequence.received is not None:
            sequence.status = Status.LOAD
            self.loading.append(sequence)
        else:
            sequence.status = Status.PREFILL
            self.prefilling.append(sequence)

    def start_running(self, sequence: Sequence) -> None:
        """Its first token is launched (or its cache is back): it joins the decode batch."""
        sequence.status = Status.RUNNING
        self.running.append(sequence)

    def finish(self, sequence: Sequence) -> None:
        """It ended (finished, failed or cancelled): give back its blocks and its row."""
        if sequence.status is Status.FINISHED and sequence.row < 0:
            return
        sequence.status = Status.FINISHED
        for queue in (self.admitted, self.running):
            if sequence in queue:
                queue.remove(sequence)
        for waiting in (self.prefilling, self.loading, self.swapped):
            if sequence in waiting:
                waiting.remove(sequence)
        if self.blocks is not None:
            self.blocks.release(sequence.block_table)
        if sequence.row >= 0:
            self._free_rows.append(sequence.row)
            sequence.row = -1
        sequence.received = sequence.hidden = sequence.prompt = None

    def reap(self) -> list[Sequence]:
        """Finish every cancelled sequence; returns them."""
        gone = [
            s
            for queue in (
                self.admitted,
                self.prefilling,
                self.loading,
                self.running,
                self.swapped,
            )
            for s in queue
            if s.cancelled
        ]
        for sequence in gone:
            self.finish(sequence)
        return gone

    # planning

    def schedule(self) -> Plan:
        """The next iteration's work (call `reap` and `admit` first)."""
        plan = Plan()
        self._swap_in(plan)
        plan.loads.extend(self.loading)
        self.loading.clear()
        plan.prefill = self._prefill()
        plan.decode = self._decode(plan)
        return plan

    def _swap_in(self, plan: Plan) -> None:
        while self.swapped and self.blocks is not None:
            sequence = self.swapped[0]
            if not self.blocks.can_allocate(sequence.length + 1, headroom=len(self.running)):
                break
            self.swapped.popleft()
            self.blocks.allocate(sequence.block_table, sequence.length + 1)
            plan.loads.append(sequence)

    def _prefill(self) -> list[Chunk]:
        if not self.prefilling:
            return []
        head = self.prefilling[0]
        if head.prefilled > 0 or head.prompt_len > self.chunk_tokens:
            end = min(head.prompt_len, head.prefilled + self.chunk_tokens)
            if end == head.prompt_len:
                self.prefilling.popleft()
            return [Chunk(head, end)]
        chunks: list[Chunk] = []
        longest = 0
        while self.prefilling and len(chunks) < self.prefill_batch:
            sequence = self.prefilling[0]
            if sequence.prefilled > 0 or sequence.prompt_len > self.chunk_tokens:
                break
            longest = max(longest, sequence.prompt_len)
            if chunks and longest * (len(chunks) + 1) > self.chunk_tokens:
                break
            chunks.append(Chunk(self.prefilling.popleft(), sequence.prompt_len))
        return chunks

    def _decode(self, plan: Plan) -> list[Sequence]:
        batch: list[Sequence] = []
        for sequence in list(self.running):
            if sequence.status is not Status.RUNNING or not self._may_step(sequence):
                continue
            if not self._grow(sequence, plan):
                continue
            batch.append(sequence)
        return [s for s in batch if s.status is Status.RUNNING]

    def _may_step(self, sequence: Sequence) -> bool:
        """Whether another token may be launched (the host may not know the last ones)."""
        return sequence.launched < sequence.max_tokens and sequence.length < self.max_len

    def _grow(self, sequence: Sequence, plan: Plan) -> bool:
        """Blocks for the position the step writes, preempting newer sequences if needed;
        False when the sequence itself had to go."""
        if self.blocks is None:
            return True
        need = sequence.length + 1
        while not self.blocks.can_grow(sequence.block_table, need):
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is sequence:
                return False
        self.blocks.allocate(sequence.block_table, need)
        return True

    def _preempt(self, victim: Sequence, plan: Plan) -> None:
        """Out of the batch and out of its blocks: the runner copies them to host memory
        (`Sequence.swap_table`) before this iteration writes anything."""
        assert self.blocks is not None
        self.running.remove(victim)
        victim.status = Status.SWAPPED
        victim.swap_table = list(victim.block_table)
        self.blocks.release(victim.block_table)
        plan.preempt.append(victim)
        self.swapped.appendleft(victim)
