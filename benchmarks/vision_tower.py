"""The encode stage's own costs: the vision tower's forward and the images' preprocessing.

1. The Qwen2.5-VL tower (7B- or tiny-shaped, random weights built from a config; bf16 on a GPU)
   on 448x448 images: transformers' forward, which attends window by window, against
   triptych's packed window attention (``packed``), and against the tower as the encode engine
   runs it (``prepared``: packed attention, the grids' layouts built on the host beforehand so
   that the forward never waits on the device, the patch embedding as one GEMM, RMSNorm and
   rotary as Triton kernels; ``prepared_gemm_only`` without the kernels), for 1, 8 and 32
   images and for three sizes at once; median of 7 timed runs after a warm-up, whether the
   packed outputs are bitwise equal, and the prepared outputs' largest difference. With
   ``--profile``, the device time of the prepared forward on 32 images by kernel.
2. Preprocessing of 448x448 PNGs with the checkpoint's image processor: all images in one call
   on one thread, against `VisionTower.preprocess` (one image per call on a thread pool).

Writes ``vision_tower_<shape>_<device>.json`` into ``--out``.

    python benchmarks/vision_tower.py [--shape 7b|tiny] [--device cuda] [--out DIR]
"""

import copy
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_client import png
from gpu_epd import SHAPES, gpu_parser, run_info

from triptych.models.tiny import default_model_path, ensure_checkpoint
from triptych.models.vision_attention import WindowLayouts, pack_window_attention
from triptych.models.vision_cuda import cuda_forwards
from triptych.models.vision_tower import VisionTower, prepare_batch, run_batch

ROOT = Path(__file__).resolve().parents[1]
GRIDS = {
    "1 image 448x448": [[1, 32, 32]],
    "8 images 448x448": [[1, 32, 32]] * 8,
    "32 images 448x448": [[1, 32, 32]] * 32,
    "448x448 + 300x517 + 640x200": [[1, 32, 32], [1, 36, 22], [1, 14, 46]],
}


def median_ms(work: Callable[[], Any], device: torch.device, runs: int = 7) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    work()
    sync()
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        work()
        sync()
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def build_tower(shape: str, device: torch.device) -> torch.nn.Module:
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    vision = {**SHAPES[shape]["vision"], "patch_size": 14, "spatial_merge_size": 2}
    config = Qwen2_5_VLConfig(vision_config={**vision, "temporal_patch_size": 2})
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(
            config.vision_config, dtype=dtype
        )
    return tower.eval()


@torch.inference_mode()
def forwards(shape: str, device: torch.device, profile: bool) -> dict[str, Any]:
    plain = build_tower(shape, device)
    packed = copy.deepcopy(plain)
    pack_window_attention(packed)
    variants = {}
    for variant, kernels in (("prepared_gemm_only", False), ("prepared", True)):
        tower, layouts = copy.deepcopy(plain), WindowLayouts()
        pack_window_attention(tower, layouts)
        cuda_forwards(tower, kernels=kernels)
        variants[variant] = (tower, layouts)
    dtype = next(plain.parameters()).dtype
    width = plain.config.in_channels * plain.config.temporal_patch_size * plain.config.patch_size**2
    out: dict[str, Any] = {}
    for name, grids in GRIDS.items():
        rows = sum(t * h * w for t, h, w in grids)
        pixels = torch.randn(rows, width, device=device, dtype=dtype)
        grid = torch.tensor(grids, device=device)
        expected = plain(pixels, grid_thw=grid).pooler_output
        got = packed(pixels, grid_thw=grid).pooler_output
        host = pixels.cpu()
        out[name] = {
            "transformers_ms": median_ms(lambda: plain(pixels, grid_thw=grid), device),  # noqa: B023
            "packed_ms": median_ms(lambda: packed(pixels, grid_thw=grid), device),  # noqa: B023
            "bitwise_equal": bool(torch.equal(expected, got)),
            "output_max_abs": float(expected.float().abs().max()),
        }
        for variant, (tower, layouts) in variants.items():
            began = time.perf_counter()
            batch = prepare_batch(tower, host, torch.tensor(grids), dtype, device)
            out[name][f"{variant}_host_prepare_ms"] = (time.perf_counter() - began) * 1e3

            def prepared(
                tower: torch.nn.Module = tower, layouts: WindowLayouts = layouts, batch: Any = batch
            ) -> torch.Tensor:
                return run_batch(tower, layouts, batch, device)

            difference = (prepared().float() - expected.float()).abs().max()
            out[name][f"{variant}_ms"] = median_ms(prepared, device)
            out[name][f"{variant}_max_abs_diff"] = float(difference)
        print(f"  {name}: {json.dumps(out[name])}", flush=True)
        if profile and name == "32 images 448x448":
            out["profile_32_images"] = kernel_profile(prepared)  # the last variant
    return out


def kernel_profile(work: Callable[[], Any], top: int = 25) -> list[dict[str, Any]]:
    """Device time of one run of `work` by kernel, the `top` largest."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        work()
        torch.cuda.synchronize()
    rows = sorted(
        prof.key_averages(), key=lambda e: getattr(e, "device_time_total", 0), reverse=True
    )
    table = [
        {"kernel": e.key[:120], "calls": e.count, "ms": e.device_time_total / 1e3}
        for e in rows[:top]
    ]
    print(f"  total device ms: {sum(e.device_time_total for e in rows) / 1e3:.1f}", flush=True)
    for row in table:
        print(f"    {row['ms']:8.2f} ms {row['calls']:5d}x {row['kernel']}", flush=True)
    return table


def preprocessing() -> dict[str, Any]:
    tower = VisionTower(str(ensure_checkpoint(default_model_path())))
    images = [png(448) for _ in range(8)]

    def one_call(batch: list[bytes]) -> None:
        pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in batch]
        tower.processor(images=pictures, return_tensors="pt")

    cpu = torch.device("cpu")
    out = {
        "1 image, one call": median_ms(lambda: one_call(images[:1]), cpu),
        "8 images, one call": median_ms(lambda: one_call(images), cpu),
        "8 images, VisionTower.preprocess": median_ms(lambda: tower.preprocess(images), cpu),
    }
    print(f"  preprocessing (ms): {json.dumps(out)}", flush=True)
    return out


def main() -> None:
    parser = gpu_parser(__doc__, checkpoint=False)
    parser.add_argument("--profile", action="store_true", help="kernel times of 32 images")
    parser.add_argument("--tag", default="", help="suffix of the result file's name")
    args = parser.parse_args()
    device = torch.device(args.device)
    summary = {
        "benchmark": "vision tower forward (transformers vs packed window attention) and "
        "image preprocessing; median ms of 7 runs",
        "model": f"Qwen2.5-VL-{args.shape} vision tower, random weights",
        **run_info(args.device),
        "forward_ms": forwards(args.shape, device, args.profile),
        "preprocessing_ms": preprocessing(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"vision_tower_{args.shape}_{device.type}{args.tag}.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
