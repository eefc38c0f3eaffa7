"""What a prompt's prefix is: chained digests of its token blocks, images by content key.

A KV cache block of a prompt is reusable by another prompt when every position up to its end
is the same input: the same token ids, and in place of the image placeholders (all one id) the
same pictures. So a full block's key is a digest chained over the previous block's key, the
block's token ids and the content keys (with offsets) of the images whose placeholder tokens
fall in it; equal keys mean equal keys and values in the cache, including M-RoPE positions,
which depend only on what precedes a position (an image's grid is part of its content key).
A block touching an image without a content key, or a video (videos have none), ends the
chain: nothing from there on is reusable.

Callers that pick an instance (the frontend for an aggregated worker, decode for prefill) use
`route_keys`, the digest of a prompt's first `ROUTE_TOKENS` tokens, so that prompts sharing a
beginning meet the instance that holds it.
"""

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from triptych.protocol import GenerateRequest, ImageItem

ROUTE_TOKENS = 64
"""Leading prompt tokens routing by prefix looks at (the whole prompt when shorter)."""


@dataclass(frozen=True)
class MediaSpan:
    """Where one image or video sits in a prompt, and what it is ("" for unknown)."""

    start: int
    end: int
    key: str


def media_spans(request: GenerateRequest) -> list[MediaSpan]:
    """The request's images and videos in prompt order; only images have content keys."""
    return [
        MediaSpan(
            item.offset,
            item.offset + item.num_tokens,
            item.content_key if isinstance(item, ImageItem) else "",
        )
        for item in request.media
    ]


def _digest(
    parent: bytes, token_ids: Sequence[int], start: int, spans: Sequence[MediaSpan]
) -> bytes | None:
    """The key of tokens ``start..start+len(token_ids)-1`` after `parent`; None when they
    touch media without a content key."""
    end = start + len(token_ids)
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    for span in spans:
        if span.start < end and span.end > start:
            if not span.key:
                return None
            digest.update(f"|{span.start}:{span.end}:{span.key}".encode())
    return digest.digest()


def block_keys(
    token_ids: Sequence[int], spans: Sequence[MediaSpan], block_size: int
) -> list[bytes]:
    """Keys of the prompt's full blocks of `block_size` tokens, from the first, up to the
    first block that cannot be keyed."""
    keys: list[bytes] = []
    parent = b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        key = _digest(parent, token_ids[start : start + block_size], start, spans)
        if key is None:
            break
        keys.append(key)
        parent = key
    return keys


def request_block_keys(request: GenerateRequest, block_size: int) -> list[bytes]:
    """`block_keys` of a request's prompt."""
    return block_keys(request.token_ids, media_spans(request), block_size)


def route_keys(request: GenerateRequest) -> list[str]:
    """The affinity key of the request's first `ROUTE_TOKENS` tokens (images by content key);
    none when they touch media without a content key."""
    head = request.token_ids[:ROUTE_TOKENS]
    key = _digest(b"route", head, 0, media_spans(request))
    return [] if key is None else [f"prefix:{key.hex()}"]
