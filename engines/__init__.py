"""Engines: the interfaces every role is served through, and their implementations."""

if __name__ != "triptych.engines":  # the folder is reached only through the package
    raise ImportError(f"import triptych.engines, not {__name__} (docs/architecture.md)")

from triptych.engines.base import (
    AggregatedEngine,
    DecodeEngine,
    EncodeEngine,
    Engine,
    GeneratingEngine,
    PrefillEngine,
    Runner,
)
from triptych.engines.encode_cache import CachedEncodeEngine, EmbeddingCache
from triptych.engines.registry import (
    ENGINES,
    EngineConfig,
    aggregated_engine,
    check_available,
    decode_engine,
    encode_engine,
    prefill_engine,
)
from triptych.engines.sglang.preflight import EngineUnavailable
from triptych.transfer import ImageEmbeddings

__all__ = [
    "ENGINES",
    "AggregatedEngine",
    "CachedEncodeEngine",
    "DecodeEngine",
    "EmbeddingCache",
    "EncodeEngine",
    "Engine",
    "EngineConfig",
    "EngineUnavailable",
    "GeneratingEngine",
    "ImageEmbeddings",
    "PrefillEngine",
    "Runner",
    "aggregated_engine",
    "check_available",
    "decode_engine",
    "encode_engine",
    "prefill_engine",
]
