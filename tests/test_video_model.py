"""Video rules of the Qwen-VL adapter: frame sampling, token counts, the checkpoint's video
processor config, placeholder expansion beside images, and M-RoPE's time axis."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from triptych.models import load_adapter
from triptych.models.base import VideoLayout
from triptych.models.mrope import MediaGrid, rope_index
from triptych.models.qwen2_vl import QwenVideoSampling, sample_frames


@pytest.mark.parametrize(
    ("total", "fps", "expected"),
    [
        (4, 10.0, [0, 1, 2, 3]),  # 0.4 s: the minimum of 4 frames
        (9, 3.0, [0, 1, 3, 4, 6, 7]),  # 3 s at 2 per second
        (60, 30.0, [0, 15, 30, 45]),  # 2 s: 4 frames
        (5, 30.0, [0, 1, 2, 3]),  # the minimum, at most what is there, a multiple of 2
    ],
)
def test_frames_are_sampled_at_two_per_second(total: int, fps: float, expected: list[int]) -> None:
    assert sample_frames(total, fps, QwenVideoSampling(), 2) == expected


def test_max_frames_and_too_short_videos() -> None:
    sampling = QwenVideoSampling(max_frames=8)
    assert len(sample_frames(3000, 30.0, sampling, 2)) == 8
    with pytest.raises(ValueError, match="at least 2 are needed"):
        sample_frames(1, 30.0, sampling, 2)


def test_layout_counts_tokens_and_seconds_per_patch(tiny_model: Path) -> None:
    adapter = load_adapter(tiny_model)
    assert adapter is not None
    layout = adapter.video_layout(total_frames=4, fps=10.0, height=56, width=56)
    assert layout == VideoLayout(
        frame_indices=(0, 1, 2, 3),
        grid_thw=(2, 4, 4),
        num_tokens=8,
        resized=(56, 56),
        second_per_grid_t=0.2,
    )


def test_the_video_processor_config_wins(tiny_model: Path, tmp_path: Path) -> None:
    """A checkpoint's video_preprocessor_config.json sets the video's fps, frames and size."""
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(tiny_model / name, tmp_path / name)
    video = {
        "fps": 1.0,
        "max_frames": 4,
        "size": {"shortest_edge": 3136 * 4, "longest_edge": 10**6},
    }
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video))
    adapter = load_adapter(tmp_path)
    assert adapter is not None
    layout = adapter.video_layout(total_frames=300, fps=30.0, height=56, width=56)
    assert layout.frame_indices == (0, 75, 150, 225)  # 10 s at 1 fps, capped at 4 frames
    assert layout.resized == (112, 112)  # at least 4 x 3136 pixels
    assert layout.second_per_grid_t == 2 / (4 / 300 * 30)


def test_capped_pixels_per_frame(tiny_model: Path) -> None:
    """qwen-vl-utils' rule: many frames share a total pixel budget."""
    adapter = load_adapter(tiny_model)
    assert adapter is not None
    sampling = QwenVideoSampling(cap_pixels_per_frame=True, max_video_tokens=64)
    adapter.video_sampling = sampling  # type: ignore[attr-defined]
    low, high = adapter.video_pixel_bounds(frames=16)  # type: ignore[attr-defined]
    assert (low, high) == (sampling.min_pixels, int(sampling.min_pixels * 1.05))


def test_images_and_videos_expand_in_prompt_order(tiny_model: Path) -> None:
    adapter = load_adapter(tiny_model)
    assert adapter is not None and adapter.video_token_id is not None
    image, video = adapter.image_token_id, adapter.video_token_id
    image_layout = adapter.image_layout(56, 56)
    video_layout = adapter.video_layout(4, 10.0, 56, 56)
    expanded, offsets = adapter.expand_placeholders(
        [1, video, 2, image, 3], [video_layout, image_layout]
    )
    assert expanded == [1, *[video] * 8, 2, *[image] * 4, 3]
    assert offsets == [1, 10]
    with pytest.raises(ValueError, match="1 image and 1 video placeholders for 2 images"):
        adapter.expand_placeholders([1, video, 2, image], [image_layout, image_layout])


def test_mrope_spaces_a_videos_patches_by_their_seconds(tiny_model: Path) -> None:
    """Qwen2.5-VL's time axis: tokens_per_second x seconds per temporal patch."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    adapter = load_adapter(tiny_model)
    assert adapter is not None and adapter.video_token_id is not None
    video = adapter.video_token_id
    ids = torch.tensor([[1, *[video] * 8, 2]])
    tokens_per_second = model.config.vision_config.tokens_per_second

    def time_axis(seconds: float) -> list[int]:
        positions, _ = rope_index(
            model.model, ids, [MediaGrid((2, 4, 4), seconds)], adapter.image_token_id, video
        )
        return [int(p) for p in positions[0, 0, 1:9]]

    assert time_axis(1.0) == [1] * 4 + [1 + tokens_per_second] * 4
    assert time_axis(0.25) == [1] * 4 + [1 + int(tokens_per_second * 0.25)] * 4
