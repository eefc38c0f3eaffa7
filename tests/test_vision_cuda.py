"""The vision towers' CUDA forwards (`vision_cuda`, `vision_kernels`) against transformers'
modules: the patch embedding's GEMM form on the CPU, the prepared forward of both tower kinds
on the CPU (bitwise), and the Triton kernels and a whole tower on CUDA (where available)."""

import copy

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionPatchEmbed,
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLRMSNorm,
    apply_rotary_pos_emb_vision,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from triptych.models.vision_attention import WindowLayouts, pack_window_attention
from triptych.models.vision_cuda import cuda_forwards, gemm_patch_embed
from triptych.models.vision_tower import prepare_batch, run_batch

GRIDS = [[1, 16, 16], [1, 12, 20], [1, 16, 16], [1, 6, 10]]
"""Image grids of several sizes, two alike (windows of several lengths)."""
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def qwen25_tower(device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    vision = {"depth": 4, "hidden_size": 64, "intermediate_size": 96, "num_heads": 4}
    vision |= {"out_hidden_size": 48, "fullatt_block_indexes": [1, 3], "window_size": 112}
    config = Qwen2_5_VLConfig(vision_config=vision).vision_config
    torch.manual_seed(0)
    with torch.device(device):
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, dtype=dtype)
    return tower.eval()


def pixels(grids: list[list[int]], width: int, device: str = "cpu") -> torch.Tensor:
    rows = sum(t * h * w for t, h, w in grids)
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(1)).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_patch_embedding_is_one_product(dtype: torch.dtype) -> None:
    embed = Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, embed_dim=96).to(dtype)
    patches = pixels([[1, 8, 12]], 3 * 2 * 14 * 14)
    with torch.inference_mode():
        expected, got = embed(patches), gemm_patch_embed(embed.proj, patches)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2_vl"])
@torch.inference_mode()
def test_the_prepared_forward_is_transformers_arithmetic_on_the_cpu(kind: str) -> None:
    if kind == "qwen2_5_vl":
        plain = qwen25_tower()
    else:
        config = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=48, num_heads=2)
        plain = Qwen2VisionTransformerPretrainedModel._from_config(config).eval()
    tower, layouts = copy.deepcopy(plain), WindowLayouts()
    pack_window_attention(tower, layouts)
    assert cuda_forwards(tower) >= 1
    grids = torch.tensor(GRIDS)
    values = pixels(GRIDS, 3 * 2 * 14 * 14)
    batch = prepare_batch(tower, values, grids, torch.float32, torch.device("cpu"))
    assert set(batch.bounds) <= {"cu_seqlens", "cu_window_seqlens"}
    expected = plain(values, grid_thw=grids).pooler_output
    assert torch.equal(run_batch(tower, layouts, batch, torch.device("cpu")), expected)


@cuda
@torch.inference_mode()
def test_the_kernels_agree_with_transformers() -> None:
    from triptych.models.vision_kernels import triton_rms_norm, triton_vision_rotary

    norm = Qwen2_5_VLRMSNorm(1280).cuda().to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3000, 1280, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(triton_rms_norm(x, norm.weight, 1e-6), norm(x))
    qkv = torch.randn(3000, 3, 16, 80, device="cuda", dtype=torch.bfloat16)
    q, k, _ = qkv.permute(1, 0, 2, 3)
    angles = torch.randn(3000, 40, device="cuda").repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()
    for got, expected in zip(
        triton_vision_rotary(q, k, cos, sin),
        apply_rotary_pos_emb_vision(q, k, cos, sin),
        strict=True,
    ):
        torch.testing.assert_close(got, expected)


@cuda
@torch.inference_mode()
def test_the_cuda_forward_agrees_with_transformers() -> None:
    plain = qwen25_tower("cuda", torch.bfloat16)
    tower, layouts = copy.deepcopy(plain), WindowLayouts()
    pack_window_attention(tower, layouts)
    cuda_forwards(tower)
    grids = torch.tensor(GRIDS)
    values = pixels(GRIDS, 3 * 2 * 14 * 14)
    device = torch.device("cuda")
    got = run_batch(
        tower, layouts, prepare_batch(tower, values, grids, torch.bfloat16, device), device
    )
    expected = plain(values.to(device, torch.bfloat16), grid_thw=grids.to(device)).pooler_output
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
