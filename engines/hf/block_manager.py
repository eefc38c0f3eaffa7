"""KV blocks: which are free, which sequence holds which, and whether one more fits.

The KV cache is cut into blocks of ``block_size`` token positions. A sequence holds a list of
blocks (its block table) that covers every position it has written; it takes blocks as it grows
and gives them all back when it ends. Block 0 is never handed out: decode steps padded to a
captured batch size write their throwaway keys and values there.
"""

from collections import deque


class BlockManager:
    """Hands out blocks ``1..num_blocks-1`` of a KV cache."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("a KV cache needs at least two blocks (one is kept for padding)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(1, num_blocks))

    @property
    def capacity(self) -> int:
        """Blocks sequences can hold."""
        return self.num_blocks - 1

    @property
    def free(self) -> int:
        """Blocks not held by any sequence."""
        return len(self._free)

    @property
    def used(self) -> int:
        """Blocks held by sequences."""
        return self.capacity - self.free

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` positions."""
        return -(-tokens // self.block_size)

    def can_allocate(self, tokens: int, headroom: int = 0) -> bool:
        """Whether `tokens` positions fit in free blocks with `headroom` blocks left over."""
        return self.blocks_for(tokens) + headroom <= self.free

    def can_grow(self, table: list[int], tokens: int) -> bool:
        """Whether `table` can grow to cover `tokens` positions."""
        return self.blocks_for(tokens) - len(table) <= self.free

    def allocate(self, table: list[int], tokens: int) -> None:
        """Grow `table` until it covers `tokens` positions (ValueError when blocks run out,
        leaving `table` as it was)."""
        need = self.blocks_for(tokens) - len(table)
        if need <= 0:
            return
        if need > len(self._free):
            raise ValueError(f"{need} KV blocks wanted, {len(self._free)} free")
        table.extend(self._free.popleft() for _ in range(need))

    def release(self, table: list[int]) -> None:
        """Give back every block of `table` and empty it."""
        self._free.extend(table)
        table.clear()
