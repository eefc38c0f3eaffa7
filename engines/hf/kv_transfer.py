"""Packing a prefilled sequence for decode: KV cache and last hidden state in one flat tensor.

Layout: keys and values of every layer, [layers, 2, kv_heads, tokens, head_dim], then the final
hidden state of the last prompt position (decode samples the first token from it, so every
topology draws its random numbers in the same place). One tensor means one NIXL READ.
"""

import torch

from triptych.engines.hf.model import LanguageModel, SequenceKV


def layout(model: LanguageModel) -> str:
    """A tag decode compares with its own before reading a cache."""
    return (
        f"kv:{model.num_layers}x2x{model.kv_heads}xTx{model.head_dim}"
        f"+h{model.hidden_size}:{str(model.dtype).removeprefix('torch.')}"
    )


def pack(sequence: SequenceKV, hidden: torch.Tensor) -> torch.Tensor:
    """KV cache and hidden state → one contiguous 1-D tensor."""
    kv = torch.stack([torch.stack([keys[0], values[0]]) for keys, values in sequence.kv])
    return torch.cat([kv.reshape(-1), hidden.reshape(-1).to(kv.dtype)])


def unpack(
    model: LanguageModel, flat: torch.Tensor, tokens: int, rope_delta: int
) -> tuple[SequenceKV, torch.Tensor]:
    """The inverse of `pack`, for a sequence of `tokens` prompt tokens."""
    shape = (model.num_layers, 2, model.kv_heads, tokens, model.head_dim)
    size = model.num_layers * 2 * model.kv_heads * tokens * model.head_dim
    if flat.numel() != size + model.hidden_size:
        raise ValueError(
            f"KV transfer of {flat.numel()} elements, expected {size + model.hidden_size}"
        )
    flat = flat.to(model.device, model.dtype)
    kv = flat[:size].view(shape)
    layers = [
        (kv[i, 0].unsqueeze(0).contiguous(), kv[i, 1].unsqueeze(0).contiguous())
        for i in range(model.num_layers)
    ]
    return SequenceKV(layers, rope_delta), flat[size:].clone()
