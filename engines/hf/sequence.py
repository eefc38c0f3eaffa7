"""One request inside the engine: its prompt, its blocks, how far it got, where its tokens go."""

import asyncio
import enum
import secrets
from dataclasses import dataclass, field
from typing import Protocol

import llguidance
import torch

from triptych.models.mrope import Grid
from triptych.protocol import FinishReason, SamplingOptions, TokenChunk


class Sink(Protocol):
    """Where a sequence's chunks go: `put` runs on `loop` (the model thread never calls it
    itself), with each chunk (the last has a finish reason) or the error that ended it."""

    loop: asyncio.AbstractEventLoop

    def put(self, item: TokenChunk | BaseException) -> None: ...


class Status(enum.Enum):
    """Where a sequence stands."""

    ADMITTED = "admitted"
    """Holds blocks for its prompt; its input (prompt or received KV cache) has not come yet."""
    PREFILL = "prefill"
    """Its prompt is being run, a chunk at a time."""
    LOAD = "load"
    """A KV cache received from a prefill worker waits to be copied into its blocks."""
    RUNNING = "running"
    """In the decode batch."""
    SWAPPED = "swapped"
    """Preempted: its cache waits in host memory for blocks."""
    FINISHED = "finished"


@dataclass
class Prompt:
    """What prefill runs: token ids, image and video grids (prompt order) and their embeddings
    (rows of the image and video tokens in order)."""

    token_ids: list[int]
    image_grids: list[Grid] = field(default_factory=list)
    embeddings: torch.Tensor | None = None


@dataclass(eq=False)
class Sequence:
    """The engine's state for one request; the model thread alone changes it, except
    `cancelled`, which the request's own task sets."""

    row: int
    """Its row in the device-side tables (last token, sampling state), fixed for its life; -1
    on a prefill-only engine."""
    request_id: str
    prompt_len: int
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.ADMITTED
    options: SamplingOptions | None = None
    stop_ids: frozenset[int] = frozenset()
    """Token ids that end generation (EOS unless ignored, plus ``stop_token_ids``)."""
    seed: int = field(default_factory=lambda: secrets.randbits(63))
    """Drives its random draws: the request's seed, or a fresh one."""
    sink: Sink | None = None
    prompt: Prompt | None = None
    """Until its prefill is done."""
    prefilled: int = 0
    """Prompt positions whose keys and values are written (or on their way)."""
    block_keys: list[bytes] = field(default_factory=list)
    """Keys of the prompt's full blocks (`models.prefix`) when prefix caching is on: its
    blocks are registered under them once written."""
    cached: int = 0
    """Prompt positions found in the prefix cache (their blocks are shared, not computed)."""
    rope_delta: int = 0
    launched: int = 0
    """Generated tokens whose computation was launched (their values may be on the device
    only)."""
    output: list[int] = field(default_factory=list)
    """Generated tokens the host has seen."""
    finish_reason: FinishReason | None = None
    received: torch.Tensor | None = None
    """A KV cache packed by a prefill worker (or by preemption), until it is loaded."""
    hidden: torch.Tensor | None = None
    """The last prompt position's final hidden state, until the first token is sampled."""
    swap_table: list[int] = field(default_factory=list)
    """The blocks a preempted sequence held, until their contents are copied out."""
    cancelled: bool = False
    """Set by the request's own task when it lets go (done, failed or cancelled)."""
    grammar: llguidance.LLMatcher | None = None
    """Follows its tokens when its output must match a grammar (`response_format`); its mask
    says which tokens may come next."""

    @property
    def length(self) -> int:
        """Positions whose keys and values are in the cache once every launched step ran."""
        return self.prompt_len + max(self.launched - 1, 0)

    @property
    def max_tokens(self) -> int:
        """Tokens it may generate at most."""
        return self.options.max_tokens if self.options is not None else 0

    @property
    def done(self) -> bool:
        """Finished or cancelled: its blocks can go back."""
        return self.status is Status.FINISHED or self.cancelled
