"""Sampling options: they travel whole from the frontend to every engine."""

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length"]

MAX_TOP_LOGPROBS = 20
"""Most alternatives a request may ask for per token (as OpenAI)."""


FINITE_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
"""Sampling fields whose values must be finite numbers (NaN and infinity pass a range check)."""


def check_finite(value: float | None) -> None:
    """Refuse NaN and infinity (None passes)."""
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")


class ResponseFormat(BaseModel):
    """The shape the output must take, enforced while decoding (OpenAI's ``response_format``
    of type ``json_object`` or ``json_schema``; ``text`` travels as no format at all)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["json_object", "json_schema"]
    schema_text: str = ""
    """The JSON schema as canonical JSON text (sorted keys, no spaces): engines cache compiled
    grammars by it. Empty for ``json_object``."""
    name: str = ""
    """The schema's name, as the client gave it."""
    strict: bool = False
    """With ``strict``, a schema keyword the grammar engine cannot enforce is an error; without
    it, such keywords are ignored (the output still parses and has the schema's structure)."""


class SamplingOptions(BaseModel):
    """Every knob the client set, resolved to concrete values by the frontend.

    No field is dropped on the way: engines either honour a field or reject the request.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    """Every float is finite (NaN and infinity pass a range check), checked in pydantic's core
    rather than by a Python validator per field, as every stage parses these options."""

    max_tokens: int = Field(ge=1)
    """Upper bound on generated tokens (the frontend resolves it against the context)."""
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    """0 means greedy."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    """0 disables top-k."""
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = None
    """Makes sampled output reproducible for the same request."""
    stop: tuple[str, ...] = ()
    """Stop strings; the frontend matches them on detokenized text (excluded from the output)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end generation (included in `usage`, not in the text)."""
    min_tokens: int = Field(default=0, ge=0)
    """EOS and stop token ids are ignored until this many tokens exist."""
    ignore_eos: bool = False
    """Keep generating past EOS (for benchmarks)."""
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    response_format: ResponseFormat | None = None
    """JSON output enforced by a grammar (None: free text)."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    """Return each generated token's log-probability and this many most likely alternatives
    (None: no logprobs). The ``hf`` engine takes them from the distribution the token was
    drawn from after penalties and temperature (temperature 0 counts as 1), before top-k,
    top-p and min-p cut it; the ``mock`` engine from its uniform draw; ``sglang`` as SGLang
    computes them."""

    @property
    def greedy(self) -> bool:
        """True when the engine must pick the most likely token at every step."""
        return self.temperature == 0.0 or self.top_k == 1
