"""The decode step's Triton kernels (CUDA only; Triton ships with CUDA builds of PyTorch).

`triton_paged_attention` (split-K "flash decoding"): one program per (row, KV head, split)
loads the row's query heads that share the KV head (grouped-query attention: the group reads
each KV block once, not once per query head), walks its share of the row's positions
``BLOCK_N`` at a time through the block table, and keeps an online softmax in float32; a second
kernel merges the splits (with one split, the first kernel writes the output itself). The grid
and every buffer depend only on the batch size and the split count, never on the lengths, so a
step that calls it can be captured in a CUDA graph once per batch size.

`triton_rope_and_store`: rotary embedding of the new token's queries and keys, and the keys'
and values' store into their cache slots, in one kernel instead of eight small ones per layer.
The MLP's activation is `vision_kernels.triton_silu_mul`, one kernel for both models.
"""

import torch
import triton
import triton.language as tl

from triptych.engines.hf.kv_cache import KVLayer
from triptych.engines.hf.paged_attention import PageTable

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
    output,
    stride_ob,
    stride_oh,
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
    if SPLITS == 1:  # the whole row here: normalize and write the output
        out = output + row * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        merged = acc / total[:, None]
        tl.store(out, merged.to(output.dtype.element_ty), mask=in_group[:, None])
    else:
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
    kv: KVLayer,
    pages: PageTable,
    *,
    scale: float,
    splits: int,
) -> torch.Tensor:
    """See `paged_attention.reference_paged_attention` for the arguments; `splits` (a power
    of two) cuts each row's span into that many pieces merged at the end."""
    keys, values = kv.keys, kv.values
    block_tables, seq_lens = pages.block_tables, pages.seq_lens
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
        output=output,
        stride_ob=output.stride(0),
        stride_oh=output.stride(1),
    )
    if splits == 1:
        return output
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


@triton.jit
def _rope_store_kernel(  # noqa: PLR0917
    qkv,
    cos,
    sin,
    slots,
    query,
    keys,
    values,
    stride_xb,
    stride_cb,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    DIM: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    half = tl.arange(0, DIM // 2)
    source = qkv + row * stride_xb + head * DIM
    slot = tl.load(slots + row).to(tl.int64)
    if head >= HEADS + KV_HEADS:  # a value head: stored as is
        whole = tl.arange(0, DIM)
        tl.store(
            values + slot * stride_ks + (head - HEADS - KV_HEADS) * stride_kh + whole,
            tl.load(source + whole),
        )
    else:
        first = tl.load(source + half).to(tl.float32)
        second = tl.load(source + DIM // 2 + half).to(tl.float32)
        c1 = tl.load(cos + row * stride_cb + half).to(tl.float32)
        c2 = tl.load(cos + row * stride_cb + DIM // 2 + half).to(tl.float32)
        s1 = tl.load(sin + row * stride_cb + half).to(tl.float32)
        s2 = tl.load(sin + row * stride_cb + DIM // 2 + half).to(tl.float32)
        out_first = first * c1 - second * s1
        out_second = second * c2 + first * s2
        if head < HEADS:
            target = query + row * stride_qb + head * stride_qh
        else:
            target = keys + slot * stride_ks + (head - HEADS) * stride_kh
        tl.store(target + half, out_first.to(query.dtype.element_ty))
        tl.store(target + DIM // 2 + half, out_second.to(query.dtype.element_ty))


def triton_rope_and_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    *,
    kv: KVLayer,
    heads: int,
) -> torch.Tensor:
    """`qkv` [B, (heads + 2 kv_heads) * D] (bias added) → rotated queries [B, heads, D]; the
    rotated keys and the values go to `kv` at `slots` [B]. `cos`/`sin`: [B, D]."""
    keys, values = kv.by_slot()
    batch = qkv.shape[0]
    _, kv_heads, dim = keys.shape
    query = torch.empty(batch, heads, dim, dtype=qkv.dtype, device=qkv.device)
    assert qkv.stride(1) == 1 and cos.stride(1) == 1 and sin.stride() == cos.stride()
    _rope_store_kernel[(batch, heads + 2 * kv_heads)](
        qkv,
        cos,
        sin,
        slots,
        query,
        keys,
        values,
        qkv.stride(0),
        cos.stride(0),
        query.stride(0),
        query.stride(1),
        keys.stride(0),
        keys.stride(1),
        HEADS=heads,
        KV_HEADS=kv_heads,
        DIM=dim,
    )
    return query
