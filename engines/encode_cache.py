"""Encode once: an LRU of image embeddings by content key, in front of any encode engine.

The frontend names each image by what it is (`ImageItem.content_key`: its pixels and the
model's processing), so the same picture under another URL, or in another lossless format, is
the same entry. A request's cached images skip the vision tower; its other images and videos go
through it in one call, and their rows join the cache. The cache is bounded in bytes and evicts
the least recently used entries that nobody is reading: a request pins the entries it uses from
lookup until its embeddings are assembled (across the forward of its other images), so a hit is
never evicted under its reader. Videos are not cached.
"""

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from triptych.engines.base import EncodeEngine, Runner
from triptych.observability import metrics
from triptych.protocol import ErrorCode, ImageItem, MediaItem, ServiceError, VideoItem
from triptych.transfer import ImageEmbeddings

log = logging.getLogger(__name__)

SIMULATED_ROW_BYTES = 2
"""Bytes per element charged for simulated (mock) rows: bfloat16's."""


@dataclass(eq=False)
class CacheEntry:
    """One image's embedding rows."""

    key: str
    rows: ImageEmbeddings
    nbytes: int
    pins: int = 0
    """Readers holding the entry: it is not evicted while above zero."""


def _nbytes(rows: ImageEmbeddings) -> int:
    if rows.tensor is None:
        return rows.num_tokens * rows.hidden_size * SIMULATED_ROW_BYTES
    tensor: torch.Tensor = rows.tensor
    return tensor.numel() * tensor.element_size()


class EmbeddingCache:
    """Image embeddings by content key: LRU, bounded in bytes, pinned entries never evicted."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self.bytes = 0
        """Bytes the entries hold now."""

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def pin(self, key: str) -> CacheEntry | None:
        """The entry for `key`, pinned and made most recent; None on a miss."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        entry.pins += 1
        return entry

    def unpin(self, entry: CacheEntry) -> None:
        """Give back a pin taken by `pin` or `put`."""
        entry.pins -= 1
        assert entry.pins >= 0, "unpinned more often than pinned"
        self._evict()

    def put(self, key: str, rows: ImageEmbeddings) -> CacheEntry | None:
        """Add an image's rows, pinned (the caller is reading them), evicting unpinned least
        recently used entries to make space; None when they cannot fit (too large, or the rest is
        pinned): the caller then holds the rows alone."""
        existing = self.pin(key)
        if existing is not None:
            return existing
        nbytes = _nbytes(rows)
        if nbytes > self.capacity_bytes:
            return None
        self._evict(space_for=nbytes)
        if self.bytes + nbytes > self.capacity_bytes:
            return None
        entry = CacheEntry(key, rows, nbytes, pins=1)
        self._entries[key] = entry
        self.bytes += nbytes
        return entry

    def _evict(self, space_for: int = 0) -> None:
        """Drop unpinned entries, oldest first, until `space_for` more bytes fit."""
        if self.bytes + space_for <= self.capacity_bytes:
            return
        for key in [k for k, e in self._entries.items() if e.pins == 0]:
            entry = self._entries.pop(key)
            self.bytes -= entry.nbytes
            if self.bytes + space_for <= self.capacity_bytes:
                return


class CachedEncodeEngine(EncodeEngine):
    """An encode engine behind an `EmbeddingCache`: hits are served without a forward."""

    def __init__(self, inner: EncodeEngine, capacity_bytes: int) -> None:
        self.inner = inner
        self.cache = EmbeddingCache(capacity_bytes)
        metrics.ENCODE_CACHE_BYTES.set_function(lambda: self.cache.bytes)
        metrics.ENCODE_CACHE_CAPACITY.set(capacity_bytes)

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    def model_runner(self) -> Runner | None:
        return self.inner.model_runner()

    async def encode(
        self, request_id: str, images: Sequence[ImageItem], videos: Sequence[VideoItem] = ()
    ) -> ImageEmbeddings:
        pinned: dict[str, CacheEntry] = {}
        uncached: dict[str, ImageItem] = {}
        """One item per distinct missing key: an image twice in a request is encoded once."""
        try:
            for image in images:
                key = image.content_key
                if not key:
                    continue
                if key in uncached or key in pinned:  # again in this request: no forward
                    metrics.ENCODE_CACHE_HITS.inc()
                    continue
                entry = self.cache.pin(key)
                if entry is None:
                    uncached[key] = image
                    metrics.ENCODE_CACHE_MISSES.inc()
                else:
                    pinned[key] = entry
                    metrics.ENCODE_CACHE_HITS.inc()
            keyless = [image for image in images if not image.content_key]
            to_encode = [*uncached.values(), *keyless]
            encoded: dict[int, ImageEmbeddings] = {}
            if to_encode or videos:
                rows = await self.inner.encode(request_id, to_encode, videos)
                encoded = _split(rows, [*to_encode, *videos])
                for key, image in uncached.items():
                    entry = self.cache.put(key, encoded[id(image)])
                    if entry is not None:
                        pinned[key] = entry
            by_key = {key: entry.rows for key, entry in pinned.items()}
            by_key.update({key: encoded[id(image)] for key, image in uncached.items()})
            media: list[MediaItem] = sorted([*images, *videos], key=lambda item: item.offset)
            return _join(
                [
                    by_key[item.content_key]
                    if isinstance(item, ImageItem) and item.content_key
                    else encoded[id(item)]
                    for item in media
                ]
            )
        finally:
            for entry in pinned.values():
                self.cache.unpin(entry)


def _split(rows: ImageEmbeddings, items: Sequence[MediaItem]) -> dict[int, ImageEmbeddings]:
    """Each item's rows (by `id(item)`), from one forward's output in prompt order."""
    ordered = sorted(items, key=lambda item: item.offset)
    if sum(item.num_tokens for item in ordered) != rows.num_tokens:
        raise ServiceError(
            ErrorCode.INTERNAL,
            f"vision tower returned {rows.num_tokens} rows for "
            f"{sum(item.num_tokens for item in ordered)} tokens",
        )
    parts: dict[int, ImageEmbeddings] = {}
    start = 0
    for item in ordered:
        end = start + item.num_tokens
        tensor = None if rows.tensor is None else rows.tensor[start:end].clone()
        parts[id(item)] = ImageEmbeddings(item.num_tokens, rows.hidden_size, tensor)
        start = end
    return parts


def _join(parts: Sequence[ImageEmbeddings]) -> ImageEmbeddings:
    """Rows of several items, concatenated in the given order."""
    hidden = parts[0].hidden_size
    num_tokens = sum(part.num_tokens for part in parts)
    tensors = [part.tensor for part in parts]
    if all(tensor is None for tensor in tensors):
        return ImageEmbeddings(num_tokens, hidden)
    if any(tensor is None for tensor in tensors):
        raise ServiceError(ErrorCode.INTERNAL, "cached and fresh embeddings differ in kind")
    return ImageEmbeddings(num_tokens, hidden, torch.cat(tensors))
