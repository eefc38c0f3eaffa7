"""Static KV memory: one region per sequence slot, allocated once from a memory budget.

The pool holds keys and values for `slots` sequences of up to `max_len` tokens each, laid out
``[layers, 2, slots, kv_heads, max_len, head_dim]``, so a batch of the first ``B`` slots and
their first ``L`` positions is a plain strided view (what a captured CUDA graph needs: fixed
addresses, no gather). Running sequences are kept in slots ``0..n-1``; when one leaves, the
ones after it move down (`move`), which copies only their filled positions.

How many slots: the budget is ``mem_fraction`` of the device's memory less what the process
holds already (weights) and a reserve for activations, or an explicit token count; never more
slots than the batch can run at once. A request beyond the slots waits in the engine's queue.
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
    """How the KV cache is sized (the ``--mem-fraction`` family of flags)."""

    max_len: int
    """Tokens one sequence may hold, prompt included (``--max-model-len``)."""
    max_running: int = 32
    """Sequences decoding at once (``--max-running-requests``)."""
    mem_fraction: float = 0.9
    """Fraction of the device's memory this process may hold, weights included."""
    kv_tokens: int | None = None
    """An explicit pool size in tokens (``--kv-cache-tokens``), instead of the fraction."""

    def slots(self, shape: KVShape, device: torch.device) -> int:
        """Sequence slots the budget allows (ValueError if not even one)."""
        per_slot = shape.bytes_per_token * self.max_len
        if self.kv_tokens is not None:
            budget = self.kv_tokens * shape.bytes_per_token
            source = f"--kv-cache-tokens {self.kv_tokens}"
        else:
            budget = _budget_bytes(self.mem_fraction, device)
            source = f"--mem-fraction {self.mem_fraction}"
        slots = min(self.max_running, budget // per_slot)
        if slots < 1:
            raise ValueError(
                f"{source} leaves {max(budget, 0) / 2**20:.0f} MiB for the KV cache, less than one "
                f"sequence of --max-model-len {self.max_len} ({per_slot / 2**20:.0f} MiB)"
            )
        return int(slots)


def _budget_bytes(fraction: float, device: torch.device) -> int:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_reserved(device)
        allowed = int(fraction * total) - held - ACTIVATION_RESERVE
        return min(allowed, free - ACTIVATION_RESERVE)
    page = os.sysconf("SC_PAGE_SIZE")
    return int(fraction * os.sysconf("SC_AVPHYS_PAGES") * page)


class KVPool:
    """Keys and values of `slots` sequences, allocated once."""

    def __init__(self, shape: KVShape, slots: int, max_len: int, device: torch.device) -> None:
        self.shape = shape
        self.slots = slots
        self.max_len = max_len
        self.data = torch.zeros(
            shape.layers,
            2,
            slots,
            shape.kv_heads,
            max_len,
            shape.head_dim,
            dtype=shape.dtype,
            device=device,
        )

    @property
    def capacity_bytes(self) -> int:
        """The pool's size."""
        return self.data.numel() * self.data.element_size()

    def keys(self, layer: int) -> torch.Tensor:
        """``[slots, kv_heads, max_len, head_dim]`` keys of one layer."""
        return self.data[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        """``[slots, kv_heads, max_len, head_dim]`` values of one layer."""
        return self.data[layer, 1]

    def load(self, slot: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Copy a prefilled cache (per layer ``[1, kv_heads, T, head_dim]``) into `slot`."""
        tokens = int(kv[0][0].shape[2])
        if tokens > self.max_len:
            raise ValueError(f"{tokens} tokens do not fit a slot of {self.max_len}")
        for layer, (keys, values) in enumerate(kv):
            self.data[layer, 0, slot, :, :tokens].copy_(keys[0])
            self.data[layer, 1, slot, :, :tokens].copy_(values[0])
        return tokens

    def move(self, source: int, target: int, tokens: int) -> None:
        """Copy the first `tokens` positions of slot `source` into slot `target`."""
        self.data[:, :, target, :, :tokens] = self.data[:, :, source, :, :tokens]
