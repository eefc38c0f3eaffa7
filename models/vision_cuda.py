"""The Qwen-VL vision towers' forward on CUDA: the patch embedding as one GEMM, the RMSNorms
and the rotary embedding as one Triton kernel each (`vision_kernels`), the MLP as two GEMMs of
aligned width around one kernel.

The patch embedding is a ``Conv3d`` whose stride equals its kernel: each patch meets the kernel
once, so the convolution is a product of the flattened patches ([rows, C*T*P*P], the
processor's layout) with the kernel viewed as [hidden, C*T*P*P]. cuDNN has no fast algorithm
for that shape in bf16 and runs it many times slower than the GEMM (transformers issue 45750);
cuBLAS runs the product at the device's matrix rate.

Qwen2.5-VL's MLP width (3,420 in the 7B tower) is not a multiple of 8 elements, so cuBLAS
falls back to slow, 2-element-aligned kernels for its three products (~250 TFLOP/s on an H200,
where the attention's run at ~720). On CUDA the gate and up projections become one product of
a width padded to a multiple of 64 (zero rows: silu(0)·0 = 0), followed by one silu·mul kernel
and the down projection over the padded width (zero columns). The padded tensors hold the
weights: the modules' own parameters become views into them, so no memory is doubled.

Every replaced forward keeps the module's own one on the CPU, so CPU outputs stay bitwise equal
to transformers' (the correctness tests' reference); on CUDA they agree to rounding (the
product's summation order, a fused multiply-add where transformers rounds twice).
"""

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from triptych.models.family import vision_module_names

MLP_ALIGN = 64
"""The padded MLP width is a multiple of this many elements."""


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


class _PaddedMLP:
    """The forward given to one gated MLP on CUDA: its weights padded and fused (see above)."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.own_forward = type(module).forward.__get__(module)
        gate, up, down = module.gate_proj, module.up_proj, module.down_proj
        width = gate.out_features
        padded = -(-width // MLP_ALIGN) * MLP_ALIGN
        weight = gate.weight
        self.gate_up = weight.new_zeros(2 * padded, gate.in_features)
        self.gate_up_bias = weight.new_zeros(2 * padded) if gate.bias is not None else None
        self.down = weight.new_zeros(down.out_features, padded)
        with torch.no_grad():
            for linear, offset in ((gate, 0), (up, padded)):
                self.gate_up[offset : offset + width] = linear.weight
                linear.weight = nn.Parameter(self.gate_up[offset : offset + width])
                if self.gate_up_bias is not None:
                    self.gate_up_bias[offset : offset + width] = linear.bias
                    linear.bias = nn.Parameter(self.gate_up_bias[offset : offset + width])
            self.down[:, :width] = down.weight
            down.weight = nn.Parameter(self.down[:, :width])

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.device != self.gate_up.device:
            return self.own_forward(hidden_states)  # type: ignore[no-any-return]
        from triptych.models.vision_kernels import triton_silu_mul

        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        activated = triton_silu_mul(F.linear(flat, self.gate_up, self.gate_up_bias))
        out = F.linear(activated, self.down, self.module.down_proj.bias)
        return out.view(*shape[:-1], out.shape[-1])


def _gated_silu(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def cuda_forwards(tower: nn.Module, kernels: bool = True) -> int:
    """Give `tower`'s patch embedding the GEMM forward and (with `kernels`) its RMSNorms, gated
    MLPs and packed attention layers' rotary embedding the Triton kernels, on CUDA. Call after
    `pack_window_attention`, with the tower on its device (a tower on the CPU keeps its MLPs
    as they are). Returns how many modules changed."""
    on_cuda = next(tower.parameters()).device.type == "cuda"
    patch_embed, rms_norm = vision_module_names("patch_embed"), vision_module_names("rms_norm")
    gated_mlp = vision_module_names("gated_mlp")
    patched = 0
    for module in tower.modules():
        name = type(module).__name__
        if name in patch_embed:
            module.forward = _GemmPatchEmbed(module)
        elif kernels and name in rms_norm:
            module.forward = _KernelRMSNorm(module)
        elif kernels and on_cuda and name in gated_mlp and _gated_silu(module):
            module.forward = _PaddedMLP(module)
        elif kernels and hasattr(module.forward, "kernel_rotary"):
            module.forward.kernel_rotary = True
        else:
            continue
        patched += 1
    return patched
