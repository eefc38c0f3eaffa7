"""Triton kernels for the Qwen2.5-VL vision tower's elementwise work on CUDA.

transformers computes the tower's RMSNorm and its rotary embedding in float32 as a chain of
separate kernels (an upcast, a square, a mean, a scale, a downcast, a product; for the rotary,
upcasts, two products, a half-swap with a negation and a concatenation, a sum): each pass
reads and writes every row, so over a batch of images these passes cost as much device time as
the tower's matrix products. Here each is one kernel that reads its inputs once and computes in
float32, as transformers does. Results agree with transformers' to the rounding of the
operations' order (a fused multiply-add where transformers rounds twice); the CPU keeps
transformers' own arithmetic. Only imported on CUDA (Triton is not in the CPU install).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(  # noqa: PLR0917 (Triton passes arguments by position)
    x, weight, out, stride_x, stride_o, eps, WIDTH: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    columns = tl.arange(0, BLOCK)
    inside = columns < WIDTH
    values = tl.load(x + row * stride_x + columns, mask=inside, other=0.0).to(tl.float32)
    variance = tl.sum(values * values, axis=0) / WIDTH
    normed = (values * tl.rsqrt(variance + eps)).to(out.dtype.element_ty)
    scale = tl.load(weight + columns, mask=inside, other=0.0)
    product = normed.to(tl.float32) * scale.to(tl.float32)
    tl.store(out + row * stride_o + columns, product.to(out.dtype.element_ty), mask=inside)


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x²) + eps))`` over the last dimension, in float32, in one
    kernel; rows of `x` [..., width] may be strided."""
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    _rms_norm_kernel[(rows.shape[0],)](
        rows,
        weight,
        out,
        rows.stride(0),
        out.stride(0),
        eps,
        WIDTH=width,
        BLOCK=triton.next_power_of_2(width),
    )
    return out.view(x.shape)


@triton.jit
def _rotary_kernel(  # noqa: PLR0917
    x,
    cos,
    sin,
    out,
    stride_xn,
    stride_xh,
    stride_cn,
    stride_on,
    stride_oh,
    HEADS: tl.constexpr,
    HALF: tl.constexpr,
    HEADS_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    heads = tl.arange(0, HEADS_BLOCK)[:, None]
    columns = tl.arange(0, BLOCK)[None, :]
    inside = (heads < HEADS) & (columns < HALF)
    half = columns < HALF
    cos_first = tl.load(cos + row * stride_cn + columns, mask=half, other=0.0).to(tl.float32)
    cos_second = tl.load(cos + row * stride_cn + HALF + columns, mask=half, other=0.0)
    sin_first = tl.load(sin + row * stride_cn + columns, mask=half, other=0.0).to(tl.float32)
    sin_second = tl.load(sin + row * stride_cn + HALF + columns, mask=half, other=0.0)
    source = x + row * stride_xn + heads * stride_xh + columns
    first = tl.load(source, mask=inside, other=0.0).to(tl.float32)
    second = tl.load(source + HALF, mask=inside, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-second, first)
    out_first = first * cos_first - second * sin_first
    out_second = second * cos_second.to(tl.float32) + first * sin_second.to(tl.float32)
    target = out + row * stride_on + heads * stride_oh + columns
    tl.store(target, out_first.to(out.dtype.element_ty), mask=inside)
    tl.store(target + HALF, out_second.to(out.dtype.element_ty), mask=inside)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rows, heads, dim = x.shape
    out = torch.empty(rows, heads, dim, dtype=x.dtype, device=x.device)
    _rotary_kernel[(rows,)](
        x,
        cos,
        sin,
        out,
        x.stride(0),
        x.stride(1),
        cos.stride(0),
        out.stride(0),
        out.stride(1),
        HEADS=heads,
        HALF=dim // 2,
        HEADS_BLOCK=triton.next_power_of_2(heads),
        BLOCK=triton.next_power_of_2(dim // 2),
    )
    return out


def triton_vision_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb_vision`` for `q`, `k` [rows, heads, dim] (strided
    in rows and heads) and `cos`, `sin` [rows, dim]: one kernel each, contiguous outputs."""
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rotary inputs must be contiguous in their last dimension")
    cos, sin = cos.contiguous(), sin.contiguous()
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@triton.jit
def _silu_mul_kernel(  # noqa: PLR0917
    gate_up,
    out,
    stride_g,
    stride_o,
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
    F32_PRODUCT: tl.constexpr,
):
    row = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < WIDTH
    gate = tl.load(gate_up + row * stride_g + columns, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gate_up + row * stride_g + WIDTH + columns, mask=inside, other=0.0)
    activated = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    if F32_PRODUCT:
        product = activated.to(tl.float32) * up.to(tl.float32)
        tl.store(out + row * stride_o + columns, product.to(out.dtype.element_ty), mask=inside)
    else:
        tl.store(out + row * stride_o + columns, activated * up, mask=inside)


def triton_silu_mul(gate_up: torch.Tensor, f32_product: bool = True) -> torch.Tensor:
    """``silu(gate) * up`` for `gate_up` [rows, 2 W] (gate, then up) in one kernel: [rows, W].

    The activation is computed in float32 and rounded to the input's dtype; with `f32_product`
    (the vision tower's MLP) the product is then taken in float32 and rounded once, without it
    (the language model's decode step) in the input's dtype."""
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(width, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), width, block, f32_product
    )
    return out
