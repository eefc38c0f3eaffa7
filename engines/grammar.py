"""JSON output enforced while decoding, with llguidance.

A response format becomes an llguidance grammar (JSON schema → grammar, compact JSON: no
whitespace between tokens, so a model cannot stall in it). `check` validates one without a
tokenizer (the frontend's 400, off its event loop). `Grammars` belongs to a decoding engine:
it compiles each schema once against the model's tokenizer (cached by the schema's text) and
hands each sequence a fresh matcher copied from the compiled one; a matcher says which tokens
may come next (`fill_masks`, one bit per token) and follows the tokens sampled.
"""

import asyncio
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np

from triptych.protocol import ErrorCode, ResponseFormat, ServiceError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

JSON_OBJECT_SCHEMA = '{"type":"object"}'
"""What ``json_object`` asks for: any JSON object."""
CACHE_SIZE = 256
"""Compiled grammars kept per engine (least recently used ones go first)."""


def grammar(fmt: ResponseFormat) -> str:
    """The llguidance grammar for `fmt`; a 400 for a schema that is not a JSON object."""
    schema = fmt.schema_text if fmt.type == "json_schema" else JSON_OBJECT_SCHEMA
    options: JsonCompileOptions = {
        "whitespace_flexible": False,
        "lenient": not fmt.strict,  # non-strict: keywords it cannot enforce are ignored
    }
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    except (ValueError, TypeError) as error:
        raise _bad(str(error)) from None


def check(fmt: ResponseFormat) -> None:
    """Raise a 400 (``param: response_format``) if `fmt`'s schema cannot be compiled."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar(fmt))
    if is_error:
        raise _bad(messages[0] if messages else "invalid schema")


def _bad(reason: str) -> ServiceError:
    return ServiceError(
        ErrorCode.BAD_REQUEST,
        f"response_format: the JSON schema cannot be enforced: {reason}",
        param="response_format",
    )


class Grammars:
    """Compiled grammars for one tokenizer, cached by schema text."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_ids or None
        )
        self._compiled: OrderedDict[tuple[str, str, bool], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, fmt: ResponseFormat) -> llguidance.LLMatcher:
        """A fresh matcher for `fmt` (compiled on first use, then copied from the cache); a
        400 if it cannot be compiled. Call it off the event loop."""
        key = (fmt.type, fmt.schema_text, fmt.strict)
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
        if compiled is None:
            compiled = llguidance.LLMatcher(self.tokenizer, grammar(fmt), log_level=0)
            if compiled.is_error():
                raise _bad(compiled.get_error())
            with self._lock:
                self._compiled[key] = compiled
                while len(self._compiled) > CACHE_SIZE:
                    self._compiled.popitem(last=False)
        return compiled.deep_copy()

    async def matcher(self, fmt: ResponseFormat) -> llguidance.LLMatcher:
        """`compile` on a worker thread."""
        return await asyncio.to_thread(self.compile, fmt)

    @property
    def cached(self) -> int:
        """Grammars compiled and kept."""
        return len(self._compiled)


def mask_words(vocab_size: int) -> int:
    """32-bit words per row of a token bitmask."""
    return (vocab_size + 31) // 32


def fill_masks(
    executor: llguidance.LLExecutor,
    matchers: list[tuple[llguidance.LLMatcher, int]],
    masks: "np.ndarray[Any, np.dtype[np.int32]]",
) -> None:
    """Write each matcher's mask of allowed next tokens into its row of `masks` ([rows, words]
    int32, C-contiguous), all rows in parallel with the GIL released."""
    rows, words = masks.shape
    executor.unsafe_compute_mask_ptr(matchers, masks.ctypes.data, words * 4, rows)
