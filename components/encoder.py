"""The vision encoder a worker runs: the encode worker's, or the inline one of a worker that
prefills (prefill, aggregated) and encodes its requests' images itself.

Not a component: the workers use it, and never each other.
"""

import argparse
import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

from triptych.components.topology import DEDICATED_ENCODER
from triptych.components.worker import WorkerConfig
from triptych.engines import CachedEncodeEngine, EncodeEngine, Engine, Runner, encode_engine
from triptych.models import load_adapter
from triptych.protocol import GenerateRequest
from triptych.runtime import Context, Service
from triptych.transfer import EmbeddingTransport

log = logging.getLogger(__name__)


def has_vision(config: WorkerConfig) -> bool:
    """Whether the checkpoint has a vision tower (a text-only model gets no encoder)."""
    return config.engine.name == "mock" or load_adapter(config.model_path) is not None


def encodes_inline(config: WorkerConfig, dedicated: bool) -> bool:
    """Whether a prefilling worker runs the vision tower itself: no encode worker sends it
    embeddings (`dedicated`), and the checkpoint has a tower."""
    return not dedicated and has_vision(config)


def add_encoder_flag(parser: argparse.ArgumentParser) -> None:
    """``--dedicated-mm-encoder``: images arrive encoded from an encode worker."""
    parser.add_argument(
        DEDICATED_ENCODER,
        action="store_true",
        help="images arrive encoded from an encode worker",
    )


def cached_encoder(config: WorkerConfig, encoder: EncodeEngine) -> EncodeEngine:
    """`encoder` behind the embedding cache, when ``--embedding-cache-bytes`` allows one."""
    if config.embedding_cache_bytes <= 0:
        return encoder
    log.info("embedding cache of %d bytes", config.embedding_cache_bytes)
    return CachedEncodeEngine(encoder, config.embedding_cache_bytes)


async def inline_encoder(
    config: WorkerConfig, dedicated: bool, runner: Runner | None = None
) -> EncodeEngine | None:
    """The started encoder of a worker that encodes images itself; None with a dedicated
    encode worker or a text-only model. `runner`: where its model work runs."""
    if not encodes_inline(config, dedicated):
        return None
    encoder = cached_encoder(config, encode_engine(config.engine.encoding(), runner))
    await encoder.start()
    return encoder


class Generates(Protocol):
    """A worker's handler: it serves the ``generate`` endpoint."""

    async def generate(self, request: GenerateRequest, ctx: Context) -> None: ...


E = TypeVar("E", bound=Engine)


async def serve_prefilling(
    config: WorkerConfig,
    engine: E,
    handler: Callable[[E, EmbeddingTransport, EncodeEngine | None], Generates],
    service: Service,
    transport: EmbeddingTransport,
    *,
    dedicated: bool,
) -> list[Engine]:
    """Serve ``handler(engine, transport, encoder)`` as the ``generate`` endpoint of a worker
    that prefills on its started `engine`: images arrive on `transport`, or are encoded by
    `encoder`, the inline one on `engine`'s runner (None: `dedicated`, or a text-only model).
    Returns the engines to close."""
    encoder = await inline_encoder(config, dedicated, engine.model_runner())
    service.add_endpoint("generate", GenerateRequest, handler(engine, transport, encoder).generate)
    return [engine] if encoder is None else [engine, encoder]
