"""Image embeddings between encoder and reader: the in-memory form and its wire handle.

An encoder `publish`es a request's embeddings and forwards the returned `EmbeddingHandle`;
the reader `read`s them back. The ``simulated`` transport moves no bytes (the mock engine's
embeddings have none); NIXL moves real ones.
"""

from dataclasses import dataclass
from typing import Any

from triptych.protocol import EmbeddingHandle, ErrorCode, ServiceError

SIMULATED = "simulated"


@dataclass(frozen=True)
class ImageEmbeddings:
    """The vision tower's output for one request's images, rows in prompt order."""

    num_tokens: int
    """Rows: must equal the sum of the images' `num_tokens`."""
    hidden_size: int
    tensor: Any = None
    """A ``torch.Tensor`` [num_tokens, hidden_size], or None when simulated."""


def publish_simulated(embeddings: ImageEmbeddings) -> EmbeddingHandle:
    """A handle for embeddings that carry no bytes."""
    if embeddings.tensor is not None:
        raise ServiceError(ErrorCode.INTERNAL, "real embeddings need a real transport (NIXL)")
    return EmbeddingHandle(
        agent=SIMULATED, shape=(embeddings.num_tokens, embeddings.hidden_size), dtype="none"
    )


def read_simulated(handle: EmbeddingHandle) -> ImageEmbeddings:
    """The embeddings behind a simulated handle."""
    if handle.agent != SIMULATED or len(handle.shape) != 2:
        raise ServiceError(ErrorCode.INTERNAL, f"cannot read embeddings from agent {handle.agent}")
    return ImageEmbeddings(num_tokens=handle.shape[0], hidden_size=handle.shape[1])
