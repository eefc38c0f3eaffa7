"""Choosing every row's next token in one batched pass on the device.

Each row carries its own options as tensors: temperature, top-k, top-p, min-p, penalties
(repetition, frequency, presence), min_tokens, and a grammar's mask (one bit per token, 32 to
an int32 word; a row free of any grammar has every bit set), so rows constrained by a
``response_format`` and free rows share one pass. Nothing is copied to the host here; the caller
reads the chosen tokens once per step.

Random draws are counter-based: the noise for token ``t`` at a row's ``n``-th generated token
is a hash of (the row's seed, ``n``, ``t``), so a seeded row draws the same numbers whatever
else is in the batch, on any device, and its token is the Gumbel-max choice over the
candidates its own filters keep (that choice does not depend on how many candidates the
batch looked at).

Log-probabilities, for rows that ask, come from the distribution the token is drawn from after
penalties and temperature (a greedy row counts as temperature 1) and before top-k, top-p and
min-p cut it: vLLM's ``processed_logprobs``. A row under a grammar reports them from the
masked distribution (its forbidden tokens at the floor, the allowed ones sharing all the mass).
They stay on the device with the tokens.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from triptych.protocol import SamplingOptions

LOGPROB_FLOOR = -9999.0
"""What an impossible token's log-probability (-inf) is reported as (JSON has no infinity)."""

_MIX = 0x45D9F3B
_LOW32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values below 2**32 (no overflow)."""
    x = (((x >> 16) ^ x) * _MIX) & _LOW32
    x = (((x >> 16) ^ x) * _MIX) & _LOW32
    return (x >> 16) ^ x


def uniform(seeds: torch.Tensor, steps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Numbers in (0, 1), one per (row's seed, row's step, token id): `seeds` and `steps` [B],
    `tokens` [B, K]."""
    base = _mix(_mix((seeds >> 32) & _LOW32) ^ (seeds & _LOW32))
    base = _mix(base ^ (steps & _LOW32))
    bits = _mix(base.view(-1, 1) ^ tokens)
    return ((bits >> 8).float() + 0.5) / float(1 << 24)


@dataclass(frozen=True)
class Row:
    """What the sampler needs of one sequence for one step."""

    row: int
    """The sequence's row in the penalty tables."""
    options: SamplingOptions
    seed: int
    step: int
    """Tokens it generated before this one."""
    stop_ids: frozenset[int]


def plain_greedy(row: Row) -> bool:
    """Whether the row's token is the plain argmax of its logits (then no sampling pass is
    needed for it)."""
    o = row.options
    return (
        o.greedy
        and o.logprobs is None
        and not penalized(o)
        and not (row.step < o.min_tokens and row.stop_ids)
    )


def penalized(options: SamplingOptions) -> bool:
    """Whether any penalty applies."""
    return bool(
        options.repetition_penalty != 1.0 or options.frequency_penalty or options.presence_penalty
    )


def apply_bitmask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """`logits` with -inf for each token whose bit in `allowed` ([n, words] int32, bit ``t % 32``
    of word ``t // 32`` for token ``t``) is clear."""
    shifts = torch.arange(32, dtype=torch.int32, device=allowed.device)
    bits = (allowed.unsqueeze(-1) >> shifts) & 1
    keep = bits.view(allowed.shape[0], -1)[:, : logits.shape[-1]].bool()
    return logits.masked_fill(~keep, float("-inf"))


@dataclass(frozen=True)
class Logprobs:
    """Log-probabilities of a batch's chosen tokens, on the device (or copied to the host)."""

    chosen: torch.Tensor
    """[n] float32: each row's token's."""
    top_ids: torch.Tensor
    """[n, k] int64: the k most likely tokens of each row, most likely first (k = the largest
    ``logprobs`` asked for in the batch)."""
    top_values: torch.Tensor
    """[n, k] float32: their log-probabilities."""


class Sampler:
    """Samples a batch's tokens; keeps per-sequence penalty state in device tables."""

    def __init__(self, vocab_size: int, rows: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.rows = rows
        self.device = device
        self._counts: torch.Tensor | None = None
        """[rows, vocab] generated-token counts, made when a penalized sequence first comes."""
        self._seen: torch.Tensor | None = None
        """[rows, vocab] tokens in the prompt or generated (repetition penalty)."""

    def start(self, row: int, options: SamplingOptions, prompt: list[int]) -> None:
        """Reset a sequence's penalty state (only penalized sequences have any)."""
        if not penalized(options):
            return
        if self._counts is None or self._seen is None:
            shape = (self.rows, self.vocab_size)
            self._counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self._seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self._counts[row].zero_()
        self._seen[row].zero_()
        if prompt:
            self._seen[row, self._tensor(sorted(set(prompt)))] = True

    def _tensor(
        self, values: Sequence[int | float | bool], dtype: torch.dtype = torch.long
    ) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def sample(
        self, logits: torch.Tensor, rows: list[Row], allowed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The next token of each row ([n] int64 on the device) from float32 logits [n, vocab]
        (which may be changed in place); `allowed` ([n, words] int32 bitmask on the device)
        limits each row to the tokens whose bits are set."""
        return self.choose(logits, rows, allowed)[0]

    def choose(
        self, logits: torch.Tensor, rows: list[Row], allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Logprobs | None]:
        """`sample`, with the log-probabilities of the tokens when a row asks for them. A row
        constrained by `allowed` gets them from the masked distribution: tokens its grammar
        forbids have none (they sit at the floor) and the allowed ones share all the mass."""
        options = [r.options for r in rows]
        index = self._tensor([r.row for r in rows])
        if allowed is not None:
            logits = apply_bitmask(logits, allowed)
        if self._counts is not None and any(penalized(o) for o in options):
            logits = self._penalize(logits, index, options)
        self._mask_stops(logits, rows)
        tokens = logits.argmax(-1)
        if not all(o.greedy for o in options):
            tokens = self._draw(logits, rows, tokens)
        asked = [o.logprobs for o in options if o.logprobs is not None]
        logprobs = self._logprobs(logits, tokens, options, max(asked)) if asked else None
        if self._counts is not None and self._seen is not None:
            self._counts[index, tokens] += 1
            self._seen[index, tokens] = True
        return tokens, logprobs

    def _logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, options: list[SamplingOptions], top: int
    ) -> Logprobs:
        temperature = self._tensor(
            [1.0 if o.greedy else o.temperature for o in options], torch.float32
        )
        logprobs = torch.log_softmax(logits.float() / temperature.view(-1, 1), -1)
        logprobs = logprobs.clamp(min=LOGPROB_FLOOR)
        chosen = logprobs.gather(-1, tokens.view(-1, 1)).view(-1)
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]), -1)
        return Logprobs(chosen, ids, values)

    def _penalize(
        self, logits: torch.Tensor, index: torch.Tensor, options: list[SamplingOptions]
    ) -> torch.Tensor:
        assert self._counts is not None and self._seen is not None
        counts = self._counts[index].float()
        if any(o.repetition_penalty != 1.0 for o in options):
            penalty = self._tensor([o.repetition_penalty for o in options], torch.float32)
            penalty = penalty.view(-1, 1)
            scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(self._seen[index], scaled, logits)
        frequency = self._tensor([o.frequency_penalty for o in options], torch.float32)
        presence = self._tensor([o.presence_penalty for o in options], torch.float32)
        return logits - frequency.view(-1, 1) * counts - presence.view(-1, 1) * (counts > 0)

    def _mask_stops(self, logits: torch.Tensor, rows: list[Row]) -> None:
        """Stop tokens cannot come before a row's ``min_tokens``."""
        pairs = [
            (i, stop)
            for i, r in enumerate(rows)
            if r.step < r.options.min_tokens
            for stop in sorted(r.stop_ids)
        ]
        if pairs:
            where = self._tensor([i for i, _ in pairs]), self._tensor([s for _, s in pairs])
            logits.index_put_(where, logits.new_full((), float("-inf")))

    def _draw(self, logits: torch.Tensor, rows: list[Row], greedy: torch.Tensor) -> torch.Tensor:
        """Temperature, top-k, top-p and min-p, then a Gumbel-max draw, for every row at once
        (greedy rows keep `greedy`)."""
        vocab = logits.shape[-1]
        options = [r.options for r in rows]
        sampled = [not o.greedy for o in options]
        top_k = [
            o.top_k if 0 < o.top_k < vocab and s else vocab if s else 1
            for o, s in zip(options, sampled, strict=True)
        ]
        width = max(k for k, s in zip(top_k, sampled, strict=True) if s)
        if width >= vocab:
            values, candidates = logits.sort(-1, descending=True)
        else:
            values, candidates = logits.topk(width, -1)
        temperature = self._tensor(
            [o.temperature if s else 1.0 for o, s in zip(options, sampled, strict=True)],
            torch.float32,
        )
        values = values / temperature.view(-1, 1)
        rank = torch.arange(values.shape[-1], device=values.device).view(1, -1)
        values = values.masked_fill(rank >= self._tensor(top_k).view(-1, 1), float("-inf"))
        if any(o.top_p < 1.0 or o.min_p > 0.0 for o in options):
            probs = torch.softmax(values, -1)
            top_p = self._tensor([o.top_p for o in options], torch.float32).view(-1, 1)
            min_p = self._tensor([o.min_p for o in options], torch.float32).view(-1, 1)
            drop = (probs.cumsum(-1) - probs > top_p) | (probs < min_p * probs[:, :1])
            values = values.masked_fill(drop, float("-inf"))
        noise = uniform(
            self._tensor([r.seed for r in rows]), self._tensor([r.step for r in rows]), candidates
        )
        # a draw of exactly 1.0 (float32 rounding) makes the Gumbel noise +inf; a filtered
        # candidate (-inf) must stay out even then (-inf + inf would be NaN, which argmax takes)
        scores = torch.where(values.isneginf(), values, values - torch.log(-torch.log(noise)))
        pick = scores.argmax(-1, keepdim=True)
        drawn = candidates.gather(-1, pick).view(-1)
        return torch.where(self._tensor(sampled, torch.bool), drawn, greedy)
