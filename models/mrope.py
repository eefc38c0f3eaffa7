"""Qwen-VL's M-RoPE positions for a prompt with images and videos, from transformers' own
``get_rope_index``.

A prompt holds runs of image tokens and of video tokens; transformers needs to be told which
run is which (``mm_token_type_ids``: 1 image, 2 video), each kind's grids in prompt order, and
for Qwen2.5-VL the seconds each video's temporal patch spans (``second_per_grid_ts``), which
spaces its frames on the time axis. Without the type ids the positions silently fall back to
1-D.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from triptych.protocol import GenerateRequest, VideoItem


@dataclass(frozen=True)
class MediaGrid:
    """One video as M-RoPE places it (a plain ``(t, h, w)`` tuple stands for an image)."""

    grid_thw: tuple[int, int, int]
    second_per_grid_t: float
    """Seconds of video one temporal patch spans."""


Grid = tuple[int, int, int] | MediaGrid
"""An image's grid, or a video."""


def media_grids(request: GenerateRequest) -> list[Grid]:
    """The request's images and videos in prompt order, as M-RoPE needs them."""
    return [
        MediaGrid(item.grid_thw, item.second_per_grid_t)
        if isinstance(item, VideoItem)
        else item.grid_thw
        for item in request.media
    ]


def vision_mask(ids: torch.Tensor, image_token_id: int, video_token_id: int | None) -> torch.Tensor:
    """Where the image and video tokens are (their embeddings' rows, in order)."""
    mask = torch.eq(ids, image_token_id)
    if video_token_id is not None:
        mask |= torch.eq(ids, video_token_id)
    return mask


def rope_index(
    vlm: Any,
    ids: torch.Tensor,
    grids: Sequence[Grid],
    image_token_id: int,
    video_token_id: int | None,
) -> tuple[torch.Tensor, int]:
    """Positions [3, 1, T] and the rope delta of one prompt `ids` [1, T]; `vlm` is the
    transformers model (``model.model``) that owns ``get_rope_index``."""
    types = torch.eq(ids, image_token_id).int()
    if video_token_id is not None:
        types += 2 * torch.eq(ids, video_token_id).int()
    images = [grid for grid in grids if not isinstance(grid, MediaGrid)]
    videos = [grid for grid in grids if isinstance(grid, MediaGrid)]
    kwargs: dict[str, torch.Tensor] = {}
    if images:
        kwargs["image_grid_thw"] = torch.tensor(images, device=ids.device)
    if videos:
        kwargs["video_grid_thw"] = torch.tensor([v.grid_thw for v in videos], device=ids.device)
        kwargs["second_per_grid_ts"] = torch.tensor([v.second_per_grid_t for v in videos])
    positions, deltas = vlm.get_rope_index(ids, mm_token_type_ids=types, **kwargs)
    return positions, int(deltas.view(-1)[0])
