"""The Triton kernel behind `paged_attention` on CUDA (split-K "flash decoding").

One program per (row, KV head, split): it loads the row's query heads that share the KV head
(grouped-query attention: the group is read once per KV block, not once per query head),
walks its share of the row's positions ``BLOCK_N`` at a time through the block table, and keeps
an online softmax in float32. A second kernel merges the splits. The grid and every buffer
depend only on the batch size and the split count, never on the lengths, so a step that calls
it can be captured in a CUDA graph once per batch size.

Imported only on CUDA machines (Triton ships with CUDA builds of PyTorch).
"""

import torch
import triton
import triton.language as tl

BLOCK_N = 32
"""Positions per iteration."""


@triton.jit
def _split_kernel(  # noqa: PLR0917 (Triton passes arguments by position)
    query,
    keys,
    values,
    tables,
    lens,
    partial,
    stats,
    scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_tb,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_sb,
    stride_sh,
    stride_ss,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLITS: tl.constexpr,
    IEEE: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens + row)
    share = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
    start = split * share
    end = tl.minimum(start + share, length)
    group = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM)
    heads = kv_head * GROUP + group
    in_group = group < GROUP
    q = tl.load(
        query + row * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=in_group[:, None],
        other=0.0,
    )
    best = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    total = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM], dtype=tl.float32)
    for first in range(start, end, BLOCK):
        positions = first + tl.arange(0, BLOCK)
        valid = positions < end
        block = tl.load(tables + row * stride_tb + positions // PAGE, mask=valid, other=0)
        base = block.to(tl.int64) * stride_kb + (positions % PAGE) * stride_kt + kv_head * stride_kh
        k = tl.load(keys + base[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        if IEEE:  # float32 caches: no TF32 rounding
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        weights = tl.exp(scores - new_best[:, None])
        rescale = tl.exp(best - new_best)
        total = total * rescale + tl.sum(weights, 1)
        v = tl.load(values + base[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            acc = acc * rescale[:, None] + tl.dot(weights, v, input_precision="ieee")
        else:
            acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
        best = new_best
    out = row * stride_pb + heads[:, None] * stride_ph + split * stride_ps + dims[None, :]
    tl.store(partial + out, acc, mask=in_group[:, None])
    where = row * stride_sb + heads * stride_sh + split * stride_ss
    tl.store(stats + where, best, mask=in_group)
    tl.store(stats + where + 1, total, mask=in_group)


@triton.jit
def _merge_kernel(  # noqa: PLR0917
    partial,
    stats,
    output,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_sb,
    stride_sh,
    stride_ss,
    stride_ob,
    stride_oh,
    DIM: tl.constexpr,
    SPLITS: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS)
    dims = tl.arange(0, DIM)
    where = row * stride_sb + head * stride_sh + splits * stride_ss
    best = tl.load(stats + where)
    total = tl.load(stats + where + 1)
    top = tl.max(best, 0)
    weights = tl.where(best > float("-inf"), tl.exp(best - top), 0.0)
    acc = tl.load(
        partial + row * stride_pb + head * stride_ph + splits[:, None] * stride_ps + dims[None, :]
    )
    merged = tl.sum(acc * weights[:, None], 0) / tl.sum(total * weights, 0)
    tl.store(output + row * stride_ob + head * stride_oh + dims, merged.to(output.dtype.element_ty))


def triton_paged_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    splits: int = 1,
) -> torch.Tensor:
    """See `paged_attention.reference_paged_attention` for the arguments; `splits` (a power
    of two) cuts each row's span into that many pieces merged at the end."""
    batch, heads, dim = query.shape
    _, page, kv_heads, _ = keys.shape
    group = heads // kv_heads
    partial = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=query.device)
    stats = torch.empty(batch, heads, splits, 2, dtype=torch.float32, device=query.device)
    output = torch.empty_like(query)
    assert keys.stride(3) == 1 and query.stride(2) == 1 and values.stride() == keys.stride()
    _split_kernel[(batch, kv_heads, splits)](
        query,
        keys,
        values,
        block_tables,
        seq_lens,
        partial,
        stats,
        scale,
        query.stride(0),
        query.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        block_tables.stride(0),
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        stats.stride(0),
        stats.stride(1),
        stats.stride(2),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        DIM=dim,
        PAGE=page,
        BLOCK=BLOCK_N,
        SPLITS=splits,
        IEEE=query.dtype == torch.float32,
    )
    _merge_kernel[(batch, heads)](
        partial,
        stats,
        output,
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        stats.stride(0),
        stats.stride(1),
        stats.stride(2),
        output.stride(0),
        output.stride(1),
        DIM=dim,
        SPLITS=splits,
    )
    return output
