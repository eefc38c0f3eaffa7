"""Packing a prefilled prompt for decode: KV cache and last hidden state in one flat tensor.

Layout: keys and values of every layer, [layers, 2, kv_heads, tokens, head_dim] (the layout
prefill's cache has, so packing is one copy), then the final hidden state of the last prompt
position (decode samples the first token from it, so every topology draws its random numbers
in the same place). One tensor means one NIXL READ; decode copies the keys and values straight
from the received tensor into its cache blocks (`unpack` makes views, no copy).
"""

from typing import Any, cast

import torch
from transformers import DynamicCache

from triptych.engines.hf.model import LanguageModel


def layout(model: LanguageModel) -> str:
    """A tag decode compares with its own before reading a cache."""
    return (
        f"kv:{model.num_layers}x2x{model.kv_heads}xTx{model.head_dim}"
        f"+h{model.hidden_size}:{str(model.dtype).removeprefix('torch.')}"
    )


def pack(
    model: LanguageModel, cache: DynamicCache, row: int, tokens: int, hidden: torch.Tensor
) -> torch.Tensor:
    """Row `row`'s first `tokens` positions of every layer of `cache`, and `hidden` [hidden],
    as one contiguous 1-D tensor."""
    layers = cast(list[Any], cache.layers)
    size = model.num_layers * 2 * model.kv_heads * tokens * model.head_dim
    flat = torch.empty(size + model.hidden_size, dtype=model.dtype, device=model.device)
    parts = [t[row, :, :tokens] for layer in layers for t in (layer.keys, layer.values)]
    out = flat[:size].view(2 * model.num_layers, model.kv_heads, tokens, model.head_dim)
    torch.stack(parts, out=out)
    flat[size:].copy_(hidden.reshape(-1))
    return flat


def unpack(
    model: LanguageModel, flat: torch.Tensor, tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a packed sequence of `tokens` prompt tokens: keys and values
    [layers, 2, tokens, kv_heads, head_dim] (what `KVCache.write` takes) and the hidden state."""
    shape = (model.num_layers, 2, model.kv_heads, tokens, model.head_dim)
    size = model.num_layers * 2 * model.kv_heads * tokens * model.head_dim
    if flat.numel() != size + model.hidden_size:
        raise ValueError(
            f"KV transfer of {flat.numel()} elements, expected {size + model.hidden_size}"
        )
    flat = flat.to(model.device, model.dtype)
    return flat[:size].view(shape).transpose(2, 3), flat[size:]
