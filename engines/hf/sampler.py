"""Choosing the next token: penalties, greedy or temperature/top-k/top-p/min-p, seeded.

Log-probabilities, when a request asks for them, come from the distribution the token is drawn
from after penalties and temperature (a greedy request counts as temperature 1) and before
top-k, top-p and min-p cut it: vLLM's ``processed_logprobs``.
"""

import torch

from triptych.protocol import FinishReason, SamplingOptions, TokenLogprob

LOGPROB_FLOOR = -9999.0
"""What an impossible token's log-probability (-inf) is reported as (JSON has no infinity)."""


class Sampler:
    """One request's sampling state: its options, its random generator, its token counts."""

    def __init__(
        self,
        options: SamplingOptions,
        prompt: list[int],
        stop_ids: set[int],
        vocab_size: int,
        device: torch.device,
    ) -> None:
        self.options = options
        self.stop_ids = stop_ids
        """Token ids that end generation (EOS unless ignored, plus `stop_token_ids`)."""
        self.generated: list[int] = []
        self.logprobs: TokenLogprob | None = None
        """The last token's log-probability and top alternatives, when the request asked."""
        self._penalties = bool(
            options.repetition_penalty != 1.0
            or options.frequency_penalty
            or options.presence_penalty
        )
        self._generator = torch.Generator(device=device)
        if options.seed is not None:
            self._generator.manual_seed(options.seed)
        else:
            self._generator.seed()
        self._seen = torch.zeros(
            vocab_size if self._penalties else 0, dtype=torch.bool, device=device
        )
        self._counts = torch.zeros(vocab_size if self._penalties else 0, device=device)
        if prompt and self._penalties:
            self._seen[torch.tensor(prompt, device=device)] = True

    def next_token(self, logits: torch.Tensor) -> int:
        """Pick the next token from float32 logits [vocab] and record it."""
        logits = self._penalized(logits)
        o = self.options
        if len(self.generated) < o.min_tokens and self.stop_ids:
            logits[list(self.stop_ids)] = -float("inf")
        scaled = logits if o.greedy else logits / o.temperature
        token = int(torch.argmax(logits)) if o.greedy else self._draw(scaled)
        if o.logprobs is not None:
            self.logprobs = _logprobs(scaled, token, o.logprobs)
        return self.accept(token)

    def takes_argmax(self) -> bool:
        """Whether the next token is the plain argmax of the logits: greedy, nothing to apply.

        Then the caller may pick it from a batched argmax and `accept` it, saving a copy and a
        device sync per sequence.
        """
        o = self.options
        return (
            o.greedy
            and o.logprobs is None
            and not self._penalties
            and not (len(self.generated) < o.min_tokens and self.stop_ids)
        )

    def accept(self, token: int) -> int:
        """Record `token` as the next one."""
        self.generated.append(token)
        if self._penalties:
            self._seen[token] = True
            self._counts[token] += 1
        return token

    def finished(self) -> FinishReason | None:
        """ "stop" or "length" once the request is done, else None."""
        if self.generated[-1] in self.stop_ids and len(self.generated) > self.options.min_tokens:
            return "stop"
        if len(self.generated) >= self.options.max_tokens:
            return "length"
        return None

    def _penalized(self, logits: torch.Tensor) -> torch.Tensor:
        o = self.options
        logits = logits.clone()
        if o.repetition_penalty != 1.0:
            seen = logits[self._seen]
            logits[self._seen] = torch.where(
                seen > 0, seen / o.repetition_penalty, seen * o.repetition_penalty
            )
        if o.frequency_penalty:
            logits -= o.frequency_penalty * self._counts
        if o.presence_penalty:
            logits -= o.presence_penalty * (self._counts > 0).float()
        return logits

    def _draw(self, logits: torch.Tensor) -> int:
        o = self.options
        if o.top_k > 0:
            kth = torch.topk(logits, min(o.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        probs = torch.softmax(logits, dim=-1)
        if o.min_p > 0:
            probs = probs.masked_fill(probs < o.min_p * probs.max(), 0.0)
        if o.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > o.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self._generator))


def _logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under softmax(`logits`) and the `top` most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).clamp(min=LOGPROB_FLOOR)
    best = torch.topk(logprobs, min(top, logprobs.numel())) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best else []
    return TokenLogprob(logprob=float(logprobs[token]), top=pairs)
