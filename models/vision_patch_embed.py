"""The Qwen-VL patch embedding as one matrix product on CUDA.

The towers embed patches with a ``Conv3d`` whose stride equals its kernel: each patch meets the
kernel once, so the convolution is a product of the flattened patches ([rows, C*T*P*P], the
processor's layout) with the kernel viewed as [hidden, C*T*P*P]. cuDNN has no fast algorithm
for that shape in bf16 and runs it many times slower than the GEMM (transformers issue 45750);
cuBLAS runs the product at the device's matrix rate. On the CPU, oneDNN's convolution is
already a GEMM: the module keeps its own forward there, so CPU outputs stay bitwise equal to
transformers' (the correctness tests' reference); the product agrees with it to rounding.
"""

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

PATCH_EMBED_CLASSES = ("Qwen2_5_VisionPatchEmbed", "PatchEmbed")
"""The towers' patch embeddings (Qwen2.5-VL, Qwen2-VL) whose forward is replaced."""


class _GemmPatchEmbed:
    """The forward given to one patch-embedding module."""

    def __init__(self, module: Any) -> None:
        self.module = module
        conv = module.proj
        if not (
            isinstance(conv, nn.Conv3d)
            and conv.stride == conv.kernel_size
            and conv.padding == (0, 0, 0)
            and conv.dilation == (1, 1, 1)
            and conv.groups == 1
        ):
            raise ValueError(f"the patch embedding {conv} is not a patch-wise projection")
        self.conv_forward = type(module).forward.__get__(module)

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.device.type != "cuda":
            return self.conv_forward(hidden_states)  # type: ignore[no-any-return]
        return gemm_patch_embed(self.module.proj, hidden_states)


def gemm_patch_embed(conv: nn.Conv3d, patches: torch.Tensor) -> torch.Tensor:
    """`conv` applied to flattened patches [rows, C*T*P*P] as one product: [rows, hidden]."""
    weight = conv.weight
    flat = patches.reshape(-1, weight[0].numel()).to(weight.dtype)
    return F.linear(flat, weight.view(weight.shape[0], -1), conv.bias)


def gemm_patch_embedding(tower: nn.Module) -> int:
    """Give `tower`'s patch embedding the GEMM forward on CUDA; returns how many modules."""
    patched = 0
    for module in tower.modules():
        if type(module).__name__ in PATCH_EMBED_CLASSES:
            module.forward = _GemmPatchEmbed(module)
            patched += 1
    return patched
