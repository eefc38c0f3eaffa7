"""The hf engine's bookkeeping, without a model: KV blocks, admission by free blocks, chunked
prefill that leaves room for decode steps, preemption when blocks run out."""

import pytest
import torch

from triptych.engines.hf.block_manager import BlockManager
from triptych.engines.hf.kv_cache import KVBudget, KVShape
from triptych.engines.hf.scheduler import Admission, Scheduler
from triptych.engines.hf.sequence import Prompt, Sequence, Status
from triptych.protocol import SamplingOptions


def test_blocks_are_handed_out_as_a_sequence_grows_and_all_come_back() -> None:
    blocks = BlockManager(num_blocks=6, block_size=4)
    assert (blocks.capacity, blocks.free) == (5, 5)
    table: list[int] = []
    blocks.allocate(table, 5)  # 5 positions: 2 blocks
    assert len(table) == 2 and 0 not in table
    blocks.allocate(table, 8)  # still 2
    assert len(table) == 2
    blocks.allocate(table, 9)
    assert len(table) == 3 and blocks.free == 2
    assert blocks.can_grow(table, 20) and not blocks.can_grow(table, 21)
    with pytest.raises(ValueError, match="3 KV blocks wanted, 2 free"):
        blocks.allocate(table, 24)
    assert len(table) == 3  # unchanged by the failure
    other: list[int] = []
    blocks.allocate(other, 8)
    assert set(table).isdisjoint(other) and blocks.free == 0
    blocks.release(table)
    assert table == [] and blocks.free == 3


def scheduler(
    blocks: int = 10, size: int = 4, rows: int = 8, chunk: int = 64, batch: int = 8
) -> Scheduler:
    return Scheduler(
        BlockManager(blocks, size), rows, max_len=64, chunk_tokens=chunk, prefill_batch=batch
    )


def admit(sched: Scheduler, *prompt_lens: int) -> list[Admission]:
    waiting = [Admission(f"r{i}", n) for i, n in enumerate(prompt_lens)]
    sched.waiting.extend(waiting)
    sched.admit()
    return waiting


def start(sched: Scheduler, sequence: Sequence, max_tokens: int = 100) -> None:
    """Submit a sequence's prompt and pretend its prefill ran, first token included."""
    sequence.options = SamplingOptions(max_tokens=max_tokens)
    sequence.prompt = Prompt(list(range(sequence.prompt_len)))
    sched.submit(sequence)
    sched.prefilling.remove(sequence)
    sequence.prefilled, sequence.launched = sequence.prompt_len, 1
    sched.start_running(sequence)


def test_admission_waits_for_free_blocks_not_for_slots() -> None:
    sched = scheduler(blocks=10, size=4)  # 9 usable blocks of 4 positions
    first, second, third = admit(sched, 10, 10, 10)  # 3 blocks each, one spare per live one
    assert first.granted and second.granted and not third.granted
    assert sched.blocks is not None and sched.blocks.free == 3
    assert third in sched.waiting
    sched.finish(first.granted)
    sched.admit()
    assert third.granted is not None and not sched.waiting
    # short prompts: many more sequences in the same blocks
    short = scheduler(blocks=10, size=4)
    granted = [a for a in admit(short, *[2] * 8) if a.granted]
    assert len(granted) == 5  # one block each, plus one spare per sequence already admitted


def test_at_context_length_8192_the_memory_of_four_slots_runs_62_sequences_of_500_tokens() -> None:
    """The issue's KV target: at --context-length 8192 a static cache of one slot per sequence
    holds 4 sequences in 4 x 8192 token positions; blocks of 16 hold 62 sequences of 500 tokens
    (a 499-token prompt and the position its first generated token writes), all decoding."""
    shape = KVShape(layers=28, kv_heads=4, head_dim=128, dtype=torch.bfloat16)
    budget = KVBudget(max_len=8192, max_running=128, kv_tokens=4 * 8192, block_size=16)
    num_blocks = budget.num_blocks(shape, torch.device("cpu"))
    assert num_blocks == 4 * 8192 // 16 + 1  # the padding block besides
    sched = Scheduler(
        BlockManager(num_blocks, 16), 128, max_len=8192, chunk_tokens=2048, prefill_batch=8
    )
    granted = [a.granted for a in admit(sched, *[499] * 100) if a.granted is not None]
    assert len(granted) == 62  # 32 blocks each, and one spare per live sequence
    for sequence in granted:
        start(sched, sequence, max_tokens=2)
    plan = sched.schedule()  # every sequence writes its 500th position
    assert plan.decode == granted and not plan.preempt
    assert len(plan.decode) >= 4 * 4


def test_admission_is_first_come_first_served_and_a_withdrawn_request_steps_aside() -> None:
    sched = scheduler(blocks=10, size=4)
    big, small = admit(sched, 40, 2)  # 40 positions need 11 blocks: the head waits, so does 2
    assert not big.granted and not small.granted
    assert not sched.fits(36) and sched.fits(35)  # 9 blocks hold 36 positions, 1 kept to generate
    big.withdrawn = True
    sched.admit()
    assert small.granted is not None


def test_a_long_prompt_runs_a_chunk_per_step_and_decodes_run_between() -> None:
    sched = scheduler(blocks=40, size=4, chunk=8)
    running, long = (a.granted for a in admit(sched, 3, 20))
    assert running is not None and long is not None
    start(sched, running)
    long.prompt = Prompt(list(range(20)))
    long.options = SamplingOptions(max_tokens=4)
    sched.submit(long)
    ends = []
    for _ in range(3):
        plan = sched.schedule()
        assert plan.decode == [running]  # every step: the running sequence decodes too
        assert [c.sequence for c in plan.prefill] == [long]
        ends.append(plan.prefill[0].end)
        long.prefilled = plan.prefill[0].end
        running.launched += 1
    assert ends == [8, 16, 20] and not sched.prefilling
    assert sched.schedule().prefill == []


def test_short_prompts_share_a_prefill_step_within_the_chunk_budget() -> None:
    sched = scheduler(blocks=60, size=4, chunk=16, batch=8)
    sequences = [a.granted for a in admit(sched, 6, 6, 6, 3)]
    for sequence in sequences:
        assert sequence is not None
        sequence.prompt = Prompt(list(range(sequence.prompt_len)))
        sequence.options = SamplingOptions(max_tokens=4)
        sched.submit(sequence)
    first = sched.schedule().prefill
    assert [c.sequence for c in first] == sequences[:2]  # 3 x 6 padded would exceed 16
    assert all(c.last for c in first)
    second = sched.schedule().prefill
    assert [c.sequence for c in second] == sequences[2:]  # 2 x 6 = 12 fits


def test_a_received_cache_is_loaded_then_decoded() -> None:
    sched = scheduler()
    [admission] = admit(sched, 5)
    sequence = admission.granted
    assert sequence is not None
    sequence.received = object()  # type: ignore[assignment]
    sched.submit(sequence)
    assert sequence.status is Status.LOAD
    assert sched.schedule().loads == [sequence]
    assert not sched.loading


def test_when_blocks_run_out_the_newest_sequence_waits_in_host_memory() -> None:
    sched = scheduler(blocks=7, size=4)  # 6 usable blocks
    old, new = (a.granted for a in admit(sched, 8, 8))  # 2 blocks each
    assert old is not None and new is not None and sched.blocks is not None
    start(sched, old)
    start(sched, new)
    plan = sched.schedule()  # both write position 8: a third block each
    assert plan.decode == [old, new] and not plan.preempt and sched.blocks.free == 0
    for s in (old, new):
        s.launched += 4  # positions 8..11 written, the blocks are full
    plan = sched.schedule()  # old needs a fourth block: new goes
    assert plan.decode == [old] and plan.preempt == [new]
    assert new.status is Status.SWAPPED and new.block_table == [] and len(new.swap_table) == 3
    new.swap_table = []
    new.received = object()  # type: ignore[assignment]  # what the runner copied out
    blocked = admit(sched, 1)[0]
    assert not blocked.granted  # nothing new comes in while a sequence waits to come back
    sched.finish(old)
    plan = sched.schedule()
    assert plan.loads == [new] and len(new.block_table) == 4  # its 13 positions
    sched.start_running(new)
    assert sched.admit() == [blocked]


def test_a_sequence_stops_being_scheduled_at_its_limits() -> None:
    sched = scheduler(blocks=40, size=4)
    [admission] = admit(sched, 60)
    sequence = admission.granted
    assert sequence is not None
    start(sched, sequence, max_tokens=3)
    assert sched.schedule().decode == [sequence]
    sequence.launched = 3  # max_tokens launched: the host will see them, no more steps
    assert sched.schedule().decode == []
    sequence.launched, sequence.options = 2, SamplingOptions(max_tokens=100)
    sequence.launched = 5  # 60 + 4 positions = --max-model-len 64
    assert sched.schedule().decode == []
