"""Paged KV memory: one tensor of fixed-size blocks, allocated once from a memory budget.

Layout ``[layers, 2, blocks, block_size, kv_heads, head_dim]``: a token's keys (or values) of
one layer sit at *slot* ``block * block_size + offset`` of the flattened
``[layers, 2, blocks * block_size, kv_heads, head_dim]`` view, so writing a prompt's cache,
packing it for another process or loading one received are each one indexed copy over every
layer at once.

A decoding engine holds its sequences here; a prefill-only engine holds only the prompt prefixes
it keeps for reuse (prefix caching).

How many blocks: ``--mem-fraction-static`` of the device's memory less what the process holds
already (weights) and a reserve for activations, or an explicit ``--kv-cache-tokens``; never
more than ``--max-running-requests`` sequences of ``--max-model-len`` tokens could fill (a pool
beyond that could never be used).
"""

import os
from dataclasses import dataclass

import torch

ACTIVATION_RESERVE = 2 << 30
"""Bytes a CUDA device keeps free of KV for prefill activations, graphs and the allocator."""


@dataclass(frozen=True)
class KVShape:
    """What one token of KV cache is made of."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize


@dataclass(frozen=True)
class KVBudget:
    """How the KV cache is sized (``--mem-fraction-static`` and its neighbours)."""

    max_len: int
    """Tokens one sequence may hold, prompt included (``--max-model-len``)."""
    max_running: int = 128
    """Sequences decoding at once (``--max-running-requests``)."""
    mem_fraction_static: float = 0.9
    """Fraction of the device's memory this process may hold, weights included."""
    kv_tokens: int | None = None
    """An explicit pool size in tokens (``--kv-cache-tokens``), instead of the fraction."""
    block_size: int = 16
    """Token positions per block (``--page-size``)."""
    share: float = 1.0
    """Share of the memory budget the pool takes (a prefill-only engine's prefix cache leaves
    space for the caches it packs); an explicit ``kv_tokens`` is taken whole."""

    def num_blocks(self, shape: KVShape, device: torch.device) -> int:
        """Blocks the budget allows, the padding block included (ValueError if it holds less
        than one sequence of ``max_len`` tokens)."""
        per_block = shape.bytes_per_token * self.block_size
        if self.kv_tokens is not None:
            budget = self.kv_tokens * shape.bytes_per_token
            source = f"--kv-cache-tokens {self.kv_tokens}"
        else:
            budget = int(_budget_bytes(self.mem_fraction_static, device) * self.share)
            source = f"--mem-fraction-static {self.mem_fraction_static}"
        usable = -(-self.max_running * self.max_len // self.block_size)
        blocks = min(max(budget, 0) // per_block, usable)
        one_sequence = -(-self.max_len // self.block_size)
        if blocks < one_sequence:
            raise ValueError(
                f"{source} leaves {max(budget, 0) / 2**20:.0f} MiB for the KV cache, less than one "
                f"sequence of --max-model-len {self.max_len} "
                f"({one_sequence * per_block / 2**20:.0f} MiB)"
            )
        return int(blocks) + 1


@dataclass(frozen=True)
class KVLayer:
    """One layer's keys and values in the pool."""

    keys: torch.Tensor
    """``[blocks, block_size, kv_heads, head_dim]``."""
    values: torch.Tensor
    """Same shape as `keys`."""

    def by_slot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and the values as ``[slots, kv_heads, head_dim]``: views of the same memory,
        slot ``block * block_size + offset``."""
        kv_heads, dim = self.keys.shape[2:]
        return self.keys.view(-1, kv_heads, dim), self.values.view(-1, kv_heads, dim)

    def store(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write row ``i``'s keys and values (``[B, kv_heads, head_dim]`` each) at ``slots[i]``."""
        slot_keys, slot_values = self.by_slot()
        slot_keys.index_copy_(0, slots, keys)
        slot_values.index_copy_(0, slots, values)


def _budget_bytes(fraction: float, device: torch.device) -> int:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_reserved(device)
        allowed = int(fraction * total) - held - ACTIVATION_RESERVE
        return min(allowed, free - ACTIVATION_RESERVE)
    page = os.sysconf("SC_PAGE_SIZE")
    return int(fraction * os.sysconf("SC_AVPHYS_PAGES") * page)


class KVCache:
    """Keys and values of every layer in `num_blocks` blocks, allocated once.

    Block 0 is the padding block (see `BlockManager`); it is zeroed so that reading it never
    brings non-finite garbage into masked arithmetic.
    """

    def __init__(
        self, shape: KVShape, num_blocks: int, block_size: int, device: torch.device
    ) -> None:
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        # empty, not zeros: on a CPU, untouched pages cost no memory until a sequence uses them
        self.data = torch.empty(
            shape.layers,
            2,
            num_blocks,
            block_size,
            shape.kv_heads,
            shape.head_dim,
            dtype=shape.dtype,
            device=device,
        )
        self.data[:, :, 0].zero_()
        self.slots_view = self.data.view(
            shape.layers, 2, num_blocks * block_size, shape.kv_heads, shape.head_dim
        )
        """``[layers, 2, slots, kv_heads, head_dim]``."""

    @property
    def capacity_tokens(self) -> int:
        """Token positions sequences can hold (the padding block excluded)."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def capacity_bytes(self) -> int:
        """The pool's size."""
        return self.data.numel() * self.data.element_size()

    def layer(self, index: int) -> KVLayer:
        """The keys and values of layer `index`."""
        return KVLayer(self.data[index, 0], self.data[index, 1])

    def slots(self, table: list[int], start: int, end: int) -> torch.Tensor:
        """Slot indices of positions ``start..end-1`` of a sequence with block table `table`,
        on the cache's device."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.long)[positions // self.block_size]
        host = blocks * self.block_size + positions % self.block_size
        return host.to(self.device, non_blocking=True)

    def write(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Store `kv` ``[layers, 2, tokens, kv_heads, head_dim]`` (any strides) at `slots`."""
        self.slots_view.index_copy_(2, slots, kv.to(self.shape.dtype))

    def read(self, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[layers, 2, tokens, kv_heads, head_dim]`` keys and values at `slots`."""
        if out is None:
            return self.slots_view.index_select(2, slots)
        return torch.index_select(self.slots_view, 2, slots, out=out)
