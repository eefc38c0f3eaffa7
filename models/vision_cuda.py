"""The Qwen-VL vision towers' forward on CUDA: the patch embedding as one GEMM, the RMSNorms
and the rotary embedding as one Triton kernel each (`vision_kernels`).

The patch embedding is a ``Conv3d`` whose stride equals its kernel: each patch meets the kernel
once, so the convolution is a product of the flattened patches ([rows, C*T*P*P], the
processor's layout) with the kernel viewed as [hidden, C*T*P*P]. cuDNN has no fast algorithm
for that shape in bf16 and runs it many times slower than the GEMM (transformers issue 45750);
cuBLAS runs the product at the device's matrix rate.

Every replaced forward keeps the module's own one on the CPU, so CPU outputs stay bitwise equal
to transformers' (the correctness tests' reference); on CUDA they agree to rounding (the
product's summation order, a fused multiply-add where transformers rounds twice).
"""

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

PATCH_EMBED_CLASSES = ("Qwen2_5_VisionPatchEmbed", "PatchEmbed")
"""The towers' patch embeddings (Qwen2.5-VL, Qwen2-VL) whose forward is replaced."""
RMS_NORM_CLASSES = ("Qwen2_5_VLRMSNorm",)
"""The towers' RMSNorms (Qwen2.5-VL's blocks and merger; Qwen2-VL's are LayerNorms)."""


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
        self.own_forward = type(module).forward.__get__(module)

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.device.type != "cuda":
            return self.own_forward(hidden_states)  # type: ignore[no-any-return]
        return gemm_patch_embed(self.module.proj, hidden_states)


def gemm_patch_embed(conv: nn.Conv3d, patches: torch.Tensor) -> torch.Tensor:
    """`conv` applied to flattened patches [rows, C*T*P*P] as one product: [rows, hidden]."""
    weight = conv.weight
    flat = patches.reshape(-1, weight[0].numel()).to(weight.dtype)
    return F.linear(flat, weight.view(weight.shape[0], -1), conv.bias)


class _KernelRMSNorm:
    """The forward given to one RMSNorm module."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.own_forward = type(module).forward.__get__(module)

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.device.type != "cuda":
            return self.own_forward(hidden_states)  # type: ignore[no-any-return]
        from triptych.models.vision_kernels import triton_rms_norm

        module = self.module
        return triton_rms_norm(hidden_states, module.weight, float(module.variance_epsilon))


def cuda_forwards(tower: nn.Module, kernels: bool = True) -> int:
    """Give `tower`'s patch embedding the GEMM forward and (with `kernels`) its RMSNorms and
    packed attention layers' rotary embedding the Triton kernels, on CUDA; call after
    `pack_window_attention`. Returns how many modules changed."""
    patched = 0
    for module in tower.modules():
        name = type(module).__name__
        if name in PATCH_EMBED_CLASSES:
            module.forward = _GemmPatchEmbed(module)
        elif kernels and name in RMS_NORM_CLASSES:
            module.forward = _KernelRMSNorm(module)
        elif kernels and hasattr(module.forward, "kernel_rotary"):
            module.forward.kernel_rotary = True
        else:
            continue
        patched += 1
    return patched
