"""KV blocks: which are free, which sequences hold which, and which hold a reusable prefix.

The KV cache is cut into blocks of ``block_size`` token positions. A sequence holds a list of
blocks (its block table) that covers every position it has written; it takes blocks as it grows
and gives them all back when it ends. Block 0 is never handed out: decode steps padded to a
captured batch size write their throwaway keys and values there.

Prefix caching: a full block of a prompt can be registered under its key (`models.prefix`),
after its keys and values are written. A new sequence whose prompt starts with registered keys
shares those blocks (`match`, `share`) instead of computing them again; a block counts its
holders and is never handed out while one holds it. A registered block nobody holds stays
cached, and is reclaimed least recently used first only when free blocks run out, so `free`
counts it as free.
"""

from collections import OrderedDict, deque
from collections.abc import Sequence


class BlockManager:
    """Hands out blocks ``1..num_blocks-1`` of a KV cache."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("a KV cache needs at least two blocks (one is kept for padding)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(1, num_blocks))
        """Unheld blocks without a key."""
        self._cached: OrderedDict[int, None] = OrderedDict()
        """Unheld blocks with a key, least recently released first."""
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}
        self._by_key: dict[bytes, int] = {}

    @property
    def capacity(self) -> int:
        """Blocks sequences can hold."""
        return self.num_blocks - 1

    @property
    def free(self) -> int:
        """Blocks not held by any sequence (cached ones included: they are reclaimable)."""
        return len(self._free) + len(self._cached)

    @property
    def used(self) -> int:
        """Blocks held by sequences."""
        return self.capacity - self.free

    @property
    def cached(self) -> int:
        """Blocks registered under a key (held or not)."""
        return len(self._by_key)

    def refs(self, block: int) -> int:
        """Sequences holding `block`."""
        return self._refs[block]

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` positions."""
        return -(-tokens // self.block_size)

    def can_allocate(self, tokens: int, headroom: int = 0, shared: Sequence[int] = ()) -> bool:
        """Whether `tokens` positions fit with `headroom` blocks left over, the first blocks
        being `shared` (cached blocks that `share` would take)."""
        taken = sum(1 for block in shared if self._refs[block] == 0)
        return self.blocks_for(tokens) - len(shared) + taken + headroom <= self.free

    def can_grow(self, table: list[int], tokens: int) -> bool:
        """Whether `table` can grow to cover `tokens` positions."""
        return self.blocks_for(tokens) - len(table) <= self.free

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The registered blocks of the longest prefix of `keys`."""
        blocks = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def share(self, table: list[int], blocks: Sequence[int]) -> None:
        """Append `blocks` (registered ones, from `match`) to `table`, holding them."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1
            table.append(block)

    def allocate(self, table: list[int], tokens: int) -> None:
        """Grow `table` until it covers `tokens` positions (ValueError when blocks run out,
        leaving `table` as it was); reclaims the least recently used cached blocks when no
        plain free block is left."""
        need = self.blocks_for(tokens) - len(table)
        if need <= 0:
            return
        if need > self.free:
            raise ValueError(f"{need} KV blocks wanted, {self.free} free")
        for _ in range(need):
            table.append(self._take())

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._cached.popitem(last=False)
            del self._by_key[self._key_of.pop(block)]
        self._refs[block] = 1
        return block

    def register(self, table: list[int], keys: Sequence[bytes], blocks: int) -> None:
        """Register the first `blocks` blocks of `table` under `keys` (their contents are
        written). A key registered already keeps its block; this one stays private."""
        for block, key in zip(table[:blocks], keys[:blocks], strict=False):
            if block in self._key_of or key in self._by_key:
                continue
            self._key_of[block] = key
            self._by_key[key] = block

    def release(self, table: list[int]) -> None:
        """Let go of every block of `table` and empty it. Blocks nobody holds any more become
        free, or stay cached when registered (the table's last blocks first in line for
        reclaiming: a later prompt is likelier to share a beginning)."""
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._key_of:
                self._cached[block] = None
            else:
                self._free.append(block)
        table.clear()
