"""The hf engine's encoder: vision tower only, batched across requests, packed window
attention, threaded preprocessing. (The language-model side is in test_hf_decode.py.)"""

import asyncio
import copy
import io
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch.nn import functional as F
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from triptych.engines.hf.encode import HfEncodeEngine
from triptych.models import load_adapter
from triptych.models.vision_attention import pack_window_attention
from triptych.models.vision_tower import VisionBatch, VisionTower
from triptych.protocol import ImageItem


def image_item(model_path: Path, width: int, height: int) -> ImageItem:
    buffer = io.BytesIO()
    Image.effect_noise((width, height), 60).convert("RGB").save(buffer, format="PNG")
    adapter = load_adapter(model_path)
    assert adapter is not None
    layout = adapter.image_layout(height, width)
    return ImageItem(
        width=width,
        height=height,
        grid_thw=layout.grid_thw,
        num_tokens=layout.num_tokens,
        offset=0,
        data=buffer.getvalue(),
    )


async def test_encoder_holds_only_the_vision_tower(tiny_model: Path) -> None:
    engine = HfEncodeEngine(str(tiny_model))
    await engine.start()
    assert engine.tower is not None
    names = [name for name, _ in engine.tower.module.named_parameters()]
    assert not [n for n in names if "embed_tokens" in n or "lm_head" in n or "layers." in n]
    with safe_open(str(tiny_model / "model.safetensors"), framework="pt") as weights:
        keys = [k for k in weights.keys() if k.startswith("visual.")]  # noqa: SIM118
        vision = sum(weights.get_tensor(k).numel() for k in keys)
    assert sum(p.numel() for p in engine.tower.module.parameters()) == vision
    await engine.close()


async def test_concurrent_requests_share_one_vision_forward(tiny_model: Path) -> None:
    engine = HfEncodeEngine(str(tiny_model))
    await engine.start()
    assert engine.tower is not None
    requests = [
        [image_item(tiny_model, 84, 56)],
        [image_item(tiny_model, 56, 56), image_item(tiny_model, 140, 84)],
        [image_item(tiny_model, 70, 126)],
    ]
    alone = [await engine.encode(f"r{i}", images) for i, images in enumerate(requests)]
    forwards = 0
    original = engine.tower.run

    def counting(batch: VisionBatch) -> torch.Tensor:
        nonlocal forwards
        forwards += 1
        return original(batch)

    engine.tower.run = counting  # type: ignore[method-assign]
    together = await asyncio.gather(
        *(engine.encode(f"t{i}", images) for i, images in enumerate(requests))
    )
    assert forwards == 1
    for single, batched, images in zip(alone, together, requests, strict=True):
        assert batched.num_tokens == sum(image.num_tokens for image in images)
        # float32 closeness, not equality: the batch's GEMMs have more rows than one request's,
        # and with several threads they split the work and round differently (~3e-6 here).
        torch.testing.assert_close(batched.tensor, single.tensor)
    await engine.close()


async def test_an_inline_encoder_runs_its_forwards_where_it_is_told(tiny_model: Path) -> None:
    """An aggregated worker on CUDA hands its model thread to its inline encoder."""
    ran: list[str] = []

    async def runner(work: Callable[[], Any]) -> Any:
        ran.append("runner")
        return work()

    engine = HfEncodeEngine(str(tiny_model), runner=runner)
    await engine.start()
    assert engine.tower is not None
    preprocess, prepare = engine.tower.preprocess, engine.tower.prepare

    def preprocessing(images: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        ran.append(threading.current_thread().name)
        return preprocess(images)

    def preparing(pixels: torch.Tensor, grids: torch.Tensor) -> VisionBatch:
        ran.append(threading.current_thread().name)
        return prepare(pixels, grids)

    engine.tower.preprocess = preprocessing  # type: ignore[method-assign]
    engine.tower.prepare = preparing  # type: ignore[method-assign]
    embeddings = await engine.encode("r", [image_item(tiny_model, 56, 84)])
    # the host's work (preprocessing, the layouts) stays off the runner, which gets the forward
    assert ran[2:] == ["runner"] and threading.current_thread().name not in ran[:2]
    assert embeddings.num_tokens == 6
    await engine.close()


SIZES = ((448, 448), (300, 517), (640, 200))
"""A regular image (windows of one length) and two whose edge windows are shorter."""


def test_packed_window_attention_is_transformers_arithmetic_in_fewer_calls(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tower = VisionTower(str(tiny_model))
    packed = tower.module
    plain = copy.deepcopy(packed)
    for module in plain.modules():
        vars(module).pop("forward", None)  # back to transformers' window-by-window forward
    calls = 0
    sdpa = F.scaled_dot_product_attention

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)

    def run(module: torch.nn.Module, images: Sequence[bytes]) -> tuple[torch.Tensor, int]:
        nonlocal calls
        tower.module, calls = module, 0
        return tower.encode(*tower.preprocess(images)), calls

    mixed = [image_item(tiny_model, w, h).data or b"" for w, h in SIZES]
    out, mixed_calls = run(packed, mixed)
    expected, plain_calls = run(plain, mixed)
    assert torch.equal(out, expected)
    assert plain_calls > 3 * mixed_calls
    square = [image_item(tiny_model, 448, 448).data or b"" for _ in range(2)]
    out, square_calls = run(packed, square)
    assert torch.equal(out, run(plain, square)[0])
    assert square_calls == 2  # a call per layer: 32 windows of one length, then 2 whole images


@torch.inference_mode()
def test_packing_covers_qwen2_vl_towers_too() -> None:
    """Qwen2-VL attends per whole image: images of one size share a call."""
    config = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=48, num_heads=2, mlp_ratio=2)
    plain = Qwen2VisionTransformerPretrainedModel._from_config(config).eval()
    packed = copy.deepcopy(plain)
    assert pack_window_attention(packed) == 2
    grids = torch.tensor([[1, 8, 8], [1, 6, 10], [1, 8, 8]])
    pixels = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14)
    expected, got = plain(pixels, grid_thw=grids), packed(pixels, grid_thw=grids)
    assert torch.equal(expected.pooler_output, got.pooler_output)


def test_images_preprocessed_on_threads_match_one_processor_call(tiny_model: Path) -> None:
    tower = VisionTower(str(tiny_model))
    images = [image_item(tiny_model, w, h).data or b"" for w, h in SIZES]
    pixels, grids = tower.preprocess(images)
    pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    whole = tower.processor(images=pictures, return_tensors="pt")
    assert torch.equal(pixels, whole["pixel_values"])
    assert torch.equal(grids, whole["image_grid_thw"])
