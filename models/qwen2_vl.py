"""Qwen2-VL and Qwen2.5-VL: a contiguous run of ``<|image_pad|>`` framed by vision start/end."""

import math
from dataclasses import dataclass
from typing import Any

from triptych.models.base import ImageLayout, ModelAdapter


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

    def __init__(self, config: dict[str, Any], preprocessor: dict[str, Any]) -> None:
        self.image_token_id = int(config["image_token_id"])
        self.image_start_token_id = int(config["vision_start_token_id"])
        self.image_end_token_id = int(config["vision_end_token_id"])
        self.geometry = QwenVisionGeometry.from_preprocessor(preprocessor)

    def image_layout(self, height: int, width: int) -> ImageLayout:
        g = self.geometry
        factor = g.patch_size * g.merge_size
        h, w = smart_resize(height, width, factor, g.min_pixels, g.max_pixels)
        grid = (1, h // g.patch_size, w // g.patch_size)
        return ImageLayout(grid_thw=grid, num_tokens=h * w // (factor * factor), resized=(h, w))
