"""The model on its device: runs what the scheduler planned, and nothing waits for the device.

Work is launched in stream order (cache copies, prefill, a decode step, sampling); the tokens a
launch produces reach the host through one asynchronous copy per launch (`Launch`), which the
engine reads after it has launched the next step. Freed blocks may be handed out again at
once: whatever writes them later is queued after whatever read them.
"""

import logging
from dataclasses import dataclass, replace

import llguidance
import numpy as np
import torch
from transformers import DynamicCache

from triptych.engines import grammar
from triptych.engines.hf import kv_transfer
from triptych.engines.hf.block_manager import BlockManager
from triptych.engines.hf.config import DEFAULT_MAX_LEN, HfConfig
from triptych.engines.hf.decoder import Decoder, StepInputs
from triptych.engines.hf.kv_cache import KVBudget, KVCache
from triptych.engines.hf.model import LanguageModel, PrefillState, stacked_kv
from triptych.engines.hf.sampler import Logprobs, Row, Sampler, plain_greedy
from triptych.engines.hf.scheduler import Chunk
from triptych.engines.hf.sequence import Sequence
from triptych.protocol import TokenLogprob

log = logging.getLogger(__name__)

PREFILL_PREFIX_SHARE = 0.5
"""Share of the KV budget a prefill-only engine's prefix cache takes: the rest stays for the
caches of prompts in flight (whole, until decode reads them) and a batch's activations."""


@dataclass(eq=False)
class Launch:
    """Tokens being computed for `sequences`; `values` waits for them."""

    sequences: list[Sequence]
    tokens: torch.Tensor
    """Host memory the device copies the tokens into."""
    ready: torch.cuda.Event | None = None
    logprobs: Logprobs | None = None
    """Their log-probabilities (host memory too), when a sequence asked for them."""

    def values(self) -> list[int]:
        """The tokens (waits until the device has written them)."""
        if self.ready is not None:
            self.ready.synchronize()
        return [int(t) for t in self.tokens.tolist()]

    def logprob(self, index: int, top: int) -> TokenLogprob:
        """Row `index`'s token's log-probability and its `top` most likely alternatives (after
        `values`)."""
        assert self.logprobs is not None, "no sequence of this launch asked for logprobs"
        ids = self.logprobs.top_ids[index, :top].tolist()
        values = self.logprobs.top_values[index, :top].tolist()
        return TokenLogprob(
            logprob=float(self.logprobs.chosen[index]), top=list(zip(ids, values, strict=True))
        )


class ModelRunner:
    """Owns the model, and for decoding engines the paged KV cache, its blocks, the decode
    graphs and the sampler."""

    def __init__(self, model: LanguageModel, config: HfConfig, decoding: bool) -> None:
        self.model = model
        self.decoding = decoding
        self.cuda = model.device.type == "cuda"
        max_len = config.max_len or min(model.context_length, DEFAULT_MAX_LEN)
        if max_len > model.context_length:
            raise ValueError(
                f"--max-model-len {max_len} exceeds the model's context length "
                f"({model.context_length})"
            )
        self.config = replace(config, max_len=max_len)
        self._states: dict[Sequence, PrefillState] = {}
        self.cache: KVCache | None = None
        self.blocks: BlockManager | None = None
        self.decoder: Decoder | None = None
        self.sampler: Sampler | None = None
        self._executor: llguidance.LLExecutor | None = None
        """Computes the grammar masks of a batch's constrained rows in parallel."""
        if decoding or config.prefix_cache:
            budget = KVBudget(
                max_len=max_len,
                max_running=config.max_running,
                mem_fraction_static=config.mem_fraction_static,
                kv_tokens=config.kv_tokens,
                block_size=config.page_size,
                share=1.0 if decoding else PREFILL_PREFIX_SHARE,
            )
            try:
                num_blocks = budget.num_blocks(model.kv_shape, model.device)
            except ValueError as error:
                if decoding:
                    raise
                log.warning(
                    "prefill: no space for a prefix cache, prompts computed whole: %s", error
                )
                self.config = replace(self.config, prefix_cache=False)
            else:
                self.cache = KVCache(model.kv_shape, num_blocks, config.page_size, model.device)
                self.blocks = BlockManager(num_blocks, config.page_size)
        if decoding:
            assert self.cache is not None
            self.decoder = Decoder(
                model,
                self.cache,
                max_batch=config.max_running,
                sequence_rows=config.max_running,
                max_blocks=-(-max_len // config.page_size),
                cuda_graphs=config.cuda_graphs,
            )
            self.sampler = Sampler(model.vocab_size, config.max_running + 1, model.device)

    @property
    def max_len(self) -> int:
        """Tokens one sequence may hold."""
        return self.config.max_len

    def capture(self) -> None:
        """Capture the decode graphs (CUDA)."""
        if self.decoder is not None:
            self.decoder.capture()

    # caches moving in and out

    def swap_out(self, sequences: list[Sequence]) -> None:
        """Copy preempted sequences' caches to host memory (before their blocks are reused)."""
        assert self.cache is not None
        for sequence in sequences:
            slots = self.cache.slots(sequence.swap_table, 0, sequence.length)
            sequence.received = self.cache.read(slots).to("cpu")
            sequence.swap_table = []
        log.info("preempted %d sequences to host memory", len(sequences))

    def load(self, sequences: list[Sequence]) -> Launch | None:
        """Copy received (or swapped-out) caches into their blocks; sample the first token of
        those that have none yet."""
        assert self.cache is not None
        fresh = []
        for sequence in sequences:
            kv = sequence.received
            assert kv is not None
            slots = self.cache.slots(sequence.block_table, 0, int(kv.shape[2]))
            self.cache.write(slots, kv.to(self.model.device, non_blocking=True))
            sequence.received = None
            if sequence.launched == 0:
                fresh.append(sequence)
        if not fresh:
            return None
        hidden = torch.stack([s.hidden for s in fresh if s.hidden is not None])
        for sequence in fresh:
            sequence.hidden = None
        return self._first_tokens(fresh, hidden)

    # prefill

    def prefill(
        self, chunks: list[Chunk]
    ) -> tuple[Launch | None, list[tuple[Sequence, torch.Tensor]]]:
        """Run prompt chunks. A decoding engine writes their keys and values into the blocks
        and samples the first token of each completed prompt; a prefill-only engine packs
        each completed prompt for transfer (returned with its sequence)."""
        model = self.model
        states = [self._state(chunk.sequence) for chunk in chunks]
        starts = [state.done for state in states]
        if len(chunks) == 1 and not (starts[0] == 0 and chunks[0].last):
            cache, hidden = model.prefill_chunk(states[0], chunks[0].end)
            stacked_from = starts[0]
        else:
            cache, hidden = model.prefill_together(states)
            stacked_from = 0
        for chunk, state in zip(chunks, states, strict=True):
            chunk.sequence.prefilled = chunk.end
            chunk.sequence.rope_delta = state.rope_delta
        completed = [(row, c) for row, c in enumerate(chunks) if c.last]
        for _, chunk in completed:
            self._states.pop(chunk.sequence, None)
        if not self.decoding:
            for row, chunk in completed:
                self._keep_prefix(chunk.sequence, cache, row)
            return None, [
                (c.sequence, kv_transfer.pack(model, cache, row, c.end, hidden[row]))
                for row, c in completed
            ]
        assert self.cache is not None and self.blocks is not None
        kv = stacked_kv(cache, stacked_from, max(c.end for c in chunks))
        for row, (chunk, start) in enumerate(zip(chunks, starts, strict=True)):
            sequence = chunk.sequence
            slots = self.cache.slots(sequence.block_table, start, chunk.end)
            self.cache.write(slots, kv[:, :, row, :, : chunk.end - start].transpose(2, 3))
            written = chunk.end // self.cache.block_size
            self.blocks.register(sequence.block_table, sequence.block_keys, written)
        if not completed:
            return None, []
        rows = torch.tensor([row for row, _ in completed]).to(model.device, non_blocking=True)
        launch = self._first_tokens([c.sequence for _, c in completed], hidden[rows])
        return launch, []

    def _state(self, sequence: Sequence) -> PrefillState:
        state = self._states.get(sequence)
        if state is None:
            assert sequence.prompt is not None
            state = self.model.prepare(sequence.prompt)
            if sequence.cached:
                # the cached prefix's keys and values, from the blocks it shares
                assert self.cache is not None
                slots = self.cache.slots(sequence.block_table, 0, sequence.cached)
                self.model.resume(state, self.cache.read(slots))
            self._states[sequence] = state
        return state

    def _keep_prefix(self, sequence: Sequence, cache: DynamicCache, row: int) -> None:
        """On a prefill-only engine, copy a completed prompt's keyed blocks that are not cached
        yet into the KV cache and register them (when blocks can be had), so that a later
        prompt sharing the prefix skips it. The sequence lets go of them when it finishes."""
        blocks, kv_cache = self.blocks, self.cache
        if blocks is None or kv_cache is None or not sequence.block_keys:
            return
        size = kv_cache.block_size
        have, full = len(sequence.block_table), len(sequence.block_keys)
        if full <= have or not blocks.can_grow(sequence.block_table, full * size):
            return
        blocks.allocate(sequence.block_table, full * size)
        try:
            kv = stacked_kv(cache, have * size, full * size)[:, :, row].transpose(2, 3)
            kv_cache.write(kv_cache.slots(sequence.block_table, have * size, full * size), kv)
        except Exception:  # the cache only saves work: its failure must not fail the prompt
            log.warning("could not keep a prompt's prefix blocks", exc_info=True)
            blocks.release(sequence.block_table[have:])
            del sequence.block_table[have:]
            return
        blocks.register(sequence.block_table, sequence.block_keys, full)

    def forget(self, sequence: Sequence) -> None:
        """Drop a sequence's prefill state (it ended before its prompt did)."""
        self._states.pop(sequence, None)

    # tokens

    def _first_tokens(self, sequences: list[Sequence], hidden: torch.Tensor) -> Launch:
        logits = self.model.logits(hidden)
        return self._sample(sequences, logits, logits.argmax(-1))

    def decode(self, sequences: list[Sequence]) -> Launch:
        """One decode step for `sequences` (each has a block for the position it writes)."""
        assert self.decoder is not None and self.cache is not None
        size = self.cache.block_size
        width = max(len(s.block_table) for s in sequences)
        tables = np.zeros((len(sequences), width), dtype=np.int32)
        slots = []
        for i, sequence in enumerate(sequences):
            table = sequence.block_table
            tables[i, : len(table)] = table
            at = sequence.length
            slots.append(table[at // size] * size + at % size)
        logits, argmax = self.decoder.step(
            StepInputs(
                rows=[s.row for s in sequences],
                positions=[s.length + s.rope_delta for s in sequences],
                slots=slots,
                lengths=[s.length + 1 for s in sequences],
                tables=tables,
            )
        )
        return self._sample(sequences, logits, argmax)

    def _sample(
        self, sequences: list[Sequence], logits: torch.Tensor, argmax: torch.Tensor
    ) -> Launch:
        """Choose each sequence's next token on the device, note it as the sequence's last
        token for the next step, and start copying it to the host."""
        assert self.sampler is not None and self.decoder is not None
        rows = []
        for s in sequences:
            assert s.options is not None
            rows.append(Row(s.row, s.options, s.seed, s.launched, s.stop_ids))
        allowed = self._allowed(sequences)
        logprobs = None
        if allowed is None and all(plain_greedy(r) for r in rows):
            tokens = argmax
        else:
            tokens, logprobs = self.sampler.choose(logits, rows, allowed)
        index = torch.tensor([s.row for s in sequences]).to(self.model.device, non_blocking=True)
        self.decoder.last_tokens.index_copy_(0, index, tokens)
        for sequence in sequences:
            sequence.launched += 1
        if not self.cuda:
            return Launch(sequences, tokens.clone(), None, logprobs)
        host = _to_host(tokens)
        if logprobs is not None:
            logprobs = Logprobs(
                _to_host(logprobs.chosen),
                _to_host(logprobs.top_ids),
                _to_host(logprobs.top_values),
            )
        ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ready.record()
        return Launch(sequences, host, ready, logprobs)

    def _allowed(self, sequences: list[Sequence]) -> torch.Tensor | None:
        """The tokens each row may take next as a bitmask on the device ([n, words] int32):
        its grammar's mask for a constrained row (its stop tokens too once the grammar is
        complete), every token for a free one; None when no row is constrained."""
        constrained = [(s.grammar, i) for i, s in enumerate(sequences) if s.grammar is not None]
        if not constrained:
            return None
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        masks = np.full((len(sequences), grammar.mask_words(self.model.vocab_size)), -1, np.int32)
        grammar.fill_masks(self._executor, constrained, masks)
        bits = masks.view(np.uint32)
        for matcher, i in constrained:
            if matcher.is_accepting():
                for stop in sequences[i].stop_ids:
                    bits[i, stop // 32] |= np.uint32(1 << (stop % 32))
        return torch.from_numpy(masks).to(self.model.device, non_blocking=True)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Start copying `tensor` into pinned host memory (complete once the stream reaches it)."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
