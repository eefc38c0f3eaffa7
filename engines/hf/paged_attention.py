"""Decode attention for a whole batch over the paged KV cache, in one call per layer.

Each row has one new query token (all query heads) and attends over its own ``seq_lens[row]``
positions, found through its row of ``block_tables``. On CUDA a Triton kernel does it
(`triton_paged_attention`); `reference_paged_attention` is the same arithmetic in plain
PyTorch (a gather, then one masked SDPA call): the CPU fallback and the tests' oracle.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from triptych.engines.hf.kv_cache import KVLayer


@dataclass(frozen=True)
class PageTable:
    """Where each row of a decode batch finds its positions; one step's layers share it."""

    block_tables: torch.Tensor
    """``[B, max_blocks]`` int: each row's blocks, in order."""
    seq_lens: torch.Tensor
    """``[B]`` int: positions each row attends over, the new one included."""


def reference_paged_attention(
    query: torch.Tensor,
    kv: KVLayer,
    pages: PageTable,
    *,
    scale: float,
    max_len: int | None = None,
) -> torch.Tensor:
    """``query`` [B, heads, D] → [B, heads, D].

    `max_len` bounds the span gathered (default: the whole block table).
    """
    batch, heads, dim = query.shape
    block_size, kv_heads = kv.keys.shape[1], kv.keys.shape[2]
    span = max_len if max_len is not None else pages.block_tables.shape[1] * block_size
    positions = torch.arange(span, device=query.device)
    valid = positions.view(1, span) < pages.seq_lens.view(batch, 1).to(positions.dtype)
    blocks = pages.block_tables.long()[:, positions // block_size]
    slots = torch.where(valid, blocks * block_size + positions % block_size, 0)
    keys, values = kv.by_slot()
    flat_k = keys[slots].permute(0, 2, 1, 3)  # [B, kvh, span, D]
    flat_v = values[slots].permute(0, 2, 1, 3)
    grouped = query.view(batch, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(
        grouped,
        flat_k,
        flat_v,
        attn_mask=valid.view(batch, 1, 1, span),
        scale=scale,
    )
    return out.reshape(batch, heads, dim)


def splits_for(batch: int, kv_heads: int, sms: int) -> int:
    """How many pieces each row's span is cut into, so that every multiprocessor has work:
    about two programs per multiprocessor, at most 32 pieces."""
    wanted = max(1, (2 * sms) // max(1, batch * kv_heads))
    splits = 1
    while splits * 2 <= min(wanted, 32):
        splits *= 2
    return splits


def paged_attention(
    query: torch.Tensor,
    kv: KVLayer,
    pages: PageTable,
    *,
    scale: float,
    splits: int = 1,
) -> torch.Tensor:
    """The batched decode attention: the Triton kernel on CUDA (`splits`: see `splits_for`),
    the reference elsewhere."""
    if query.device.type == "cuda":
        from triptych.engines.hf.triton_kernels import triton_paged_attention

        return triton_paged_attention(query, kv, pages, scale=scale, splits=splits)
    return reference_paged_attention(query, kv, pages, scale=scale)
