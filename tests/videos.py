"""Videos for tests, written here with PyAV (MPEG-4 Part 2 in MP4, or another container), and
the transformers oracle's view of them."""

import base64
import io
import math
import tempfile
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from PIL import Image


def clip(
    width: int,
    height: int,
    frames: int,
    fps: int,
    seed: int = 0,
    container: str = "mp4",
    noise: bool = True,
    faststart: bool = False,
) -> bytes:
    """A video of `frames` frames (noise, or black) at `fps` frames per second; `faststart`
    puts an MP4's index (every frame's size and place) before the frames, as streamed MP4s do
    (FFmpeg moves it there in a second pass over a file)."""
    if faststart:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "clip.mp4"
            _write(str(path), width, height, frames, fps, seed, "mp4", noise, faststart=True)
            return path.read_bytes()
    buffer = io.BytesIO()
    _write(buffer, width, height, frames, fps, seed, container, noise)
    return buffer.getvalue()


def _write(
    target: str | io.BytesIO,
    width: int,
    height: int,
    frames: int,
    fps: int,
    seed: int,
    container: str,
    noise: bool,
    faststart: bool = False,
) -> None:
    rng = np.random.default_rng(seed)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(target, "w", format=container, options=options) as output:
        stream = output.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            pixels = (
                rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                if noise
                else np.zeros((height, width, 3), dtype=np.uint8)
            )
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)


def video_part(data: bytes, kind: str = "mp4") -> dict[str, Any]:
    url = f"data:video/{kind};base64," + base64.b64encode(data).decode()
    return {"type": "video_url", "video_url": {"url": url}}


def sample_indices(
    metadata: Any,
    fps: float = 2.0,
    min_frames: int = 4,
    max_frames: int = 768,
    temporal_patch_size: int = 2,
    **_: Any,
) -> np.ndarray:
    """transformers' ``Qwen2VLVideoProcessor.sample_frames`` with ``fps`` (that module needs
    torchvision, which this machine lacks, so its arithmetic is restated here)."""
    total = metadata.total_num_frames
    most = math.floor(min(max_frames, total) / temporal_patch_size) * temporal_patch_size
    count = total / metadata.fps * fps
    count = min(max(count, min_frames), most, total)
    count = math.floor(count / temporal_patch_size) * temporal_patch_size
    return torch.arange(0, total, total / count).int().numpy()


def video_patches(
    processor: Any, frames: np.ndarray, size: dict[str, int], temporal_patch_size: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values_videos and video_grid_thw as transformers' video processor lays them out:
    each frame resized and normalized by the image processor (PIL), then the video
    processor's ``patchify`` (restated: its module needs torchvision)."""
    pictures = [Image.fromarray(frame) for frame in frames]
    batch = processor(images=pictures, size=size, temporal_patch_size=1, return_tensors="pt")
    _, grid_h, grid_w = (int(v) for v in batch["image_grid_thw"][0])
    patch, merge = processor.patch_size, processor.merge_size
    # undo the image processor's patchify: one normalized frame [C, H, W] each
    per_frame = batch["pixel_values"].view(
        len(pictures), grid_h // merge, grid_w // merge, merge, merge, 3, patch, patch
    )
    videos = per_frame.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(
        1, len(pictures), 3, grid_h * patch, grid_w * patch
    )
    # transformers' Qwen2VLVideoProcessor.patchify
    batch_size, num_frames, channel = videos.shape[:3]
    if pad := -num_frames % temporal_patch_size:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        num_frames += pad
    grid_t = num_frames // temporal_patch_size
    patches = videos.view(
        batch_size,
        grid_t,
        temporal_patch_size,
        channel,
        grid_h // merge,
        merge,
        patch,
        grid_w // merge,
        merge,
        patch,
    )
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    flat = patches.reshape(grid_t * grid_h * grid_w, channel * temporal_patch_size * patch * patch)
    return flat, torch.tensor([[grid_t, grid_h, grid_w]])
