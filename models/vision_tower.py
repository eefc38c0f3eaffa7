"""A VLM's vision tower on its own: only its weights are read, nothing of the language model.

The encode worker needs the tower alone; loading the whole checkpoint would put the language
model's weights in its memory (a known failure of earlier systems). Weights are read tensor by
tensor from the safetensors files, keeping only those under the tower's prefix.
"""

import functools
import io
import itertools
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoConfig, AutoImageProcessor
from transformers.initialization import no_init_weights
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_position_ids,
    get_vision_window_index,
)

from triptych.models import QwenVLAdapter, family, load_adapter
from triptych.models.checkpoint import VISION_PREFIXES, vision_shards
from triptych.models.video_decoder import VideoBounds, read_frames
from triptych.models.vision_attention import WindowLayouts, pack_window_attention
from triptych.models.vision_cuda import cuda_forwards

LONGEST = {"cu_seqlens": "max_seqlen", "cu_window_seqlens": "max_window_seqlen"}
"""transformers' keyword for the longest sequence of each ``cu_*seqlens`` a forward takes."""


def _weight_files(root: Path) -> list[Path]:
    """The files holding the tower: per the index, only those shards (an encode worker may
    have fetched no other); without an index, every weight file."""
    shards = vision_shards(root)
    if shards is not None:
        return [root / name for name in shards]
    return sorted(root.glob("*.safetensors"))


def load_vision_weights(root: Path, device: str) -> dict[str, torch.Tensor]:
    """The tower's tensors only, keyed without the prefix."""
    weights: dict[str, torch.Tensor] = {}
    for path in _weight_files(root):
        with safe_open(str(path), framework="pt", device=device) as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                prefix = next((p for p in VISION_PREFIXES if key.startswith(p)), None)
                if prefix is not None:
                    weights[key[len(prefix) :]] = handle.get_tensor(key)
    if not weights:
        raise ValueError(f"no vision-tower weights under {VISION_PREFIXES} in {root}")
    return weights


@dataclass(frozen=True)
class VideoClip:
    """A video as the tower preprocesses it: the encoded bytes and which frames to keep."""

    data: bytes
    frame_indices: tuple[int, ...]
    width: int
    """Frame size the frontend checked: a frame of another size is refused."""
    height: int


class VisionTower:
    """Preprocesses images and runs the vision tower; rows come out merged, in image order."""

    def __init__(
        self, model_path: str, device: str = "cpu", dtype: torch.dtype | None = None
    ) -> None:
        root = Path(model_path)
        config = AutoConfig.from_pretrained(model_path)
        self.dtype = dtype or getattr(config, "dtype", None) or torch.float32
        self.device = torch.device(device)
        with no_init_weights():  # every weight is loaded below: a random init is wasted
            tower = (
                family(config.model_type)
                .tower()
                .tower.load()
                ._from_config(config.vision_config, dtype=self.dtype)
            )
        missing, unexpected = tower.load_state_dict(load_vision_weights(root, "cpu"), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"vision weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        self.layouts = WindowLayouts()
        pack_window_attention(tower, self.layouts)
        self.module = tower.to(self.device).eval()
        cuda_forwards(self.module)
        self.processor = AutoImageProcessor.from_pretrained(model_path)  # type: ignore[no-untyped-call]
        adapter = load_adapter(model_path)
        self.adapter = adapter if isinstance(adapter, QwenVLAdapter) else None
        """The checkpoint's video sampling and resize rules (None: no videos)."""
        self.merge = int(config.vision_config.spatial_merge_size)
        self.hidden_size = int(
            config.vision_config.out_hidden_size
            if hasattr(config.vision_config, "out_hidden_size")
            else config.text_config.hidden_size
        )

    def preprocess(self, images: Sequence[bytes | VideoClip]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoded images (and videos) → (pixel_values, grid_thw), rows in the given order.

        Images are decoded, resized and normalized on a few threads (PIL and numpy let go of
        the GIL): one 448x448 image costs 7-13 ms of host time, eight took 64 ms on one thread
        and 24 ms on the pool on an H100 machine (`benchmarks/vision_tower.py`).
        """
        if len(images) == 1:
            return self._preprocess_one(images[0])
        parts = list(_preprocess_pool().map(self._preprocess_one, images))
        return torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])

    def _preprocess_one(self, data: bytes | VideoClip) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(data, VideoClip):
            return self._preprocess_video(data)
        picture = Image.open(io.BytesIO(data)).convert("RGB")
        batch = self.processor(images=[picture], return_tensors="pt")
        return batch["pixel_values"], batch["image_grid_thw"]

    def _preprocess_video(self, clip: VideoClip) -> tuple[torch.Tensor, torch.Tensor]:
        """A video's sampled frames → its patches [grid_t·h·w, C·T·p·p] and grid [1, 3].

        transformers' video processor needs torchvision; this builds the same layout from the
        image processor (PIL backend): each decoded frame is resized to the video's size and
        normalized on its own, then every `temporal_patch_size` consecutive frames share a
        patch (the last frame repeated to fill the final one).
        """
        if self.adapter is None or self.adapter.video_token_id is None:
            raise ValueError("this model does not accept videos")
        g = self.adapter.video_geometry
        min_pixels, max_pixels = self.adapter.video_pixel_bounds(len(clip.frame_indices))
        size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        bounds = VideoBounds(max(clip.frame_indices) + 1, clip.width * clip.height, math.inf)
        frames: list[torch.Tensor] = []
        grid_hw: tuple[int, int] = (0, 0)
        for frame in read_frames(clip.data, clip.frame_indices, bounds):
            batch = self.processor(images=[Image.fromarray(frame)], size=size, return_tensors="pt")
            _, grid_h, grid_w = (int(v) for v in batch["image_grid_thw"][0])
            grid_hw = (grid_h, grid_w)
            patches = batch["pixel_values"].view(grid_h * grid_w, 3, g.temporal_patch_size, -1)
            frames.append(patches[:, :, 0])  # the image processor repeats a frame T times
        if pad := -len(frames) % g.temporal_patch_size:
            frames.extend(frames[-1:] * pad)
        grid_t = len(frames) // g.temporal_patch_size
        stacked = torch.stack(frames).view(grid_t, g.temporal_patch_size, *frames[0].shape)
        pixel_values = stacked.permute(0, 2, 3, 1, 4).reshape(grid_t * grid_hw[0] * grid_hw[1], -1)
        return pixel_values, torch.tensor([[grid_t, *grid_hw]])

    def prepare(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> "VisionBatch":
        """The host's share of a forward (`prepare_batch`), done off the model thread."""
        return prepare_batch(self.module, pixel_values, grid_thw, self.dtype, self.device)

    def run(self, batch: "VisionBatch") -> torch.Tensor:
        """The forward of a prepared batch, launched without waiting on the device."""
        return run_batch(self.module, self.layouts, batch, self.device)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged embeddings [sum of tokens, hidden] for a batch of images."""
        return self.run(self.prepare(pixel_values, grid_thw))

    def tokens(self, grid_thw: torch.Tensor) -> list[int]:
        """Rows each image of a batch contributes."""
        return [int(n) for n in (grid_thw.prod(-1) // (self.merge**2)).tolist()]


@dataclass(frozen=True)
class VisionBatch:
    """A batch of images ready for the tower's forward (`VisionTower.prepare`)."""

    pixels: torch.Tensor
    """[patches, C*T*P*P] in the tower's dtype."""
    grid_thw: torch.Tensor
    """[images, 3] on the host."""
    layout: dict[str, torch.Tensor]
    """The forward's inputs derived from the grids, by transformers' keyword."""
    bounds: dict[str, list[int]]
    """The host's copy of each ``cu_*seqlens`` in `layout`."""


def prepare_batch(
    module: torch.nn.Module,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
) -> VisionBatch:
    """The host's share of `module`'s forward: pixels in the tower's dtype, and everything the
    forward derives from the grids (rotary positions, window order, attention bounds) computed
    by transformers' own helpers on the host, in pinned memory for a CUDA device."""
    grid = grid_thw.cpu()
    merge = int(module.spatial_merge_size)  # type: ignore[arg-type]
    layout = {
        "position_ids": get_vision_position_ids(grid, merge),
        "cu_seqlens": get_vision_cu_seqlens(grid),
    }
    if hasattr(module, "window_size"):  # Qwen2.5-VL: window attention between full layers
        window, patch = int(module.window_size), int(module.patch_size)  # type: ignore[arg-type]
        layout["window_index"], layout["cu_window_seqlens"] = get_vision_window_index(
            grid, merge, window, patch
        )
    pixels = pixel_values.to(dtype)
    if device.type == "cuda":
        pixels = pixels.pin_memory()
        layout = {name: tensor.pin_memory() for name, tensor in layout.items()}
    bounds = {name: layout[name].tolist() for name in layout if name.startswith("cu_")}
    return VisionBatch(pixels, grid, layout, bounds)


@torch.inference_mode()
def run_batch(
    module: torch.nn.Module, layouts: WindowLayouts, batch: VisionBatch, device: torch.device
) -> torch.Tensor:
    """`module`'s forward on a prepared batch: merged embeddings [sum of tokens, hidden].

    Nothing waits on the device: inputs are copied from pinned memory, the attention layers'
    window layouts (`layouts`, shared with `pack_window_attention`) are planned from the
    host's bounds, and the longest windows are given, not measured."""
    inputs: dict[str, Any] = {
        name: tensor.to(device, non_blocking=True) for name, tensor in batch.layout.items()
    }
    for name, bounds in batch.bounds.items():
        layouts.register(inputs[name], bounds)
        inputs[LONGEST[name]] = max(b - a for a, b in itertools.pairwise(bounds))
    output = module(batch.pixels.to(device, non_blocking=True), grid_thw=batch.grid_thw, **inputs)
    embeddings = output.pooler_output if hasattr(output, "pooler_output") else output
    return embeddings  # type: ignore[no-any-return]


@functools.cache
def _preprocess_pool() -> ThreadPoolExecutor:
    workers = min(8, os.cpu_count() or 1)
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preprocess")
