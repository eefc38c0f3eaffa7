"""Qwen2-VL and Qwen2.5-VL: a contiguous run of ``<|image_pad|>`` (or ``<|video_pad|>``)
framed by vision start/end."""

import math
from dataclasses import dataclass
from typing import Any

import torch

from triptych.models.base import ImageLayout, ModelAdapter, VideoLayout


@dataclass(frozen=True)
class QwenVisionGeometry:
    """The image processor's resize rule (``smart_resize``) parameters."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280 * 128

    @classmethod
    def from_preprocessor(cls, config: dict[str, Any]) -> "QwenVisionGeometry":
        """Read the checkpoint's ``preprocessor_config.json`` (min/max pixels honoured)."""
        size = config.get("size") or {}
        return cls(
            patch_size=int(config.get("patch_size", cls.patch_size)),
            merge_size=int(config.get("merge_size", cls.merge_size)),
            temporal_patch_size=int(config.get("temporal_patch_size", cls.temporal_patch_size)),
            min_pixels=int(config.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels),
            max_pixels=int(config.get("max_pixels") or size.get("longest_edge") or cls.max_pixels),
        )


@dataclass(frozen=True)
class QwenVideoSampling:
    """The video processor's frame sampling and resize parameters (transformers'
    ``Qwen2VLVideoProcessor``), read from ``video_preprocessor_config.json`` or, as
    transformers falls back, ``preprocessor_config.json``.

    transformers hands every frame to the tower unless the caller samples; a server cannot, so
    frames are always sampled at `fps`, which defaults to the 2 frames per second the Qwen
    authors sample at when the checkpoint does not say.
    """

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 28 * 28 * 768
    cap_pixels_per_frame: bool = False
    """Bound each frame by an even share of `max_video_tokens` (qwen-vl-utils' rule)."""
    max_video_tokens: int = 128000

    @classmethod
    def from_processor(cls, config: dict[str, Any]) -> "QwenVideoSampling":
        """Read a video (or image) processor config as transformers' video processor does."""
        size = config.get("size") or {}
        return cls(
            fps=float(config.get("fps") or cls.fps),
            min_frames=int(config.get("min_frames") or cls.min_frames),
            max_frames=int(config.get("max_frames") or cls.max_frames),
            min_pixels=int(config.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels),
            max_pixels=int(config.get("max_pixels") or size.get("longest_edge") or cls.max_pixels),
            cap_pixels_per_frame=bool(config.get("cap_pixels_per_frame") or False),
            max_video_tokens=int(config.get("max_video_tokens") or cls.max_video_tokens),
        )


def sample_frames(
    total_frames: int, fps: float, sampling: QwenVideoSampling, temporal_patch_size: int
) -> list[int]:
    """transformers' ``Qwen2VLVideoProcessor.sample_frames`` at ``sampling.fps``: as many
    frames as `fps` gives over the video, within [min, max] frames, a multiple of the temporal
    patch size, spread evenly."""
    tps = temporal_patch_size
    max_frames = math.floor(min(sampling.max_frames, total_frames) / tps) * tps
    wanted = total_frames / fps * sampling.fps
    wanted = min(max(wanted, sampling.min_frames), max_frames, total_frames)
    count = math.floor(wanted / tps) * tps
    if count < 1:
        raise ValueError(f"the video has {total_frames} frames; at least {tps} are needed")
    indices = torch.arange(0, total_frames, total_frames / count).int()
    return [int(i) for i in indices.tolist()]


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen-VL's resize: both sides multiples of `factor`, area within [min, max] pixels."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError("image aspect ratio must be under 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


class QwenVLAdapter(ModelAdapter):
    """Adapter for ``qwen2_vl`` and ``qwen2_5_vl`` checkpoints."""

    def __init__(
        self,
        config: dict[str, Any],
        preprocessor: dict[str, Any],
        video_preprocessor: dict[str, Any] | None = None,
    ) -> None:
        self.image_token_id = int(config["image_token_id"])
        self.image_start_token_id = int(config["vision_start_token_id"])
        self.image_end_token_id = int(config["vision_end_token_id"])
        self.geometry = QwenVisionGeometry.from_preprocessor(preprocessor)
        video = preprocessor if video_preprocessor is None else video_preprocessor
        self.video_geometry = QwenVisionGeometry.from_preprocessor(video)
        self.video_sampling = QwenVideoSampling.from_processor(video)
        video_token = config.get("video_token_id")
        self.video_token_id = int(video_token) if video_token is not None else None

    def image_layout(self, height: int, width: int) -> ImageLayout:
        g = self.geometry
        factor = g.patch_size * g.merge_size
        h, w = smart_resize(height, width, factor, g.min_pixels, g.max_pixels)
        grid = (1, h // g.patch_size, w // g.patch_size)
        return ImageLayout(grid_thw=grid, num_tokens=h * w // (factor * factor), resized=(h, w))

    def video_pixel_bounds(self, frames: int) -> tuple[int, int]:
        """(min, max) pixels of one frame of a video of `frames` sampled frames."""
        g, sampling = self.video_geometry, self.video_sampling
        max_pixels = sampling.max_pixels
        if sampling.cap_pixels_per_frame:
            factor = g.patch_size * g.merge_size
            total = int(sampling.max_video_tokens * factor * factor * 0.9)
            max_pixels = max(
                min(max_pixels, total * g.temporal_patch_size // frames),
                int(sampling.min_pixels * 1.05),
            )
        return sampling.min_pixels, max_pixels

    def video_layout(self, total_frames: int, fps: float, height: int, width: int) -> VideoLayout:
        if self.video_token_id is None:
            raise ValueError("this model does not accept videos")
        g = self.video_geometry
        frames = sample_frames(total_frames, fps, self.video_sampling, g.temporal_patch_size)
        factor = g.patch_size * g.merge_size
        min_pixels, max_pixels = self.video_pixel_bounds(len(frames))
        h, w = smart_resize(height, width, factor, min_pixels, max_pixels)
        grid_t = -(-len(frames) // g.temporal_patch_size)
        sampled_fps = len(frames) / total_frames * fps
        return VideoLayout(
            frame_indices=tuple(frames),
            grid_thw=(grid_t, h // g.patch_size, w // g.patch_size),
            num_tokens=grid_t * h * w // (factor * factor),
            resized=(h, w),
            second_per_grid_t=g.temporal_patch_size / sampled_fps,
        )
