"""Model adapters: image token counts and placeholder expansion, both prompt patterns."""

import pytest

from triptych.models.base import ImageLayout, ModelAdapter
from triptych.models.qwen2_vl import QwenVLAdapter, smart_resize


class Framed(ModelAdapter):
    """An InternVL-like family: the template emits <image> (7); the prompt needs
    <img> (5) + <ctx> (9) x N + </img> (6)."""

    image_token_id = 9
    placeholder_token_id = 7
    image_start_token_id = 5
    image_end_token_id = 6
    template_frames_images = False

    def image_layout(self, height: int, width: int) -> ImageLayout:
        return ImageLayout(grid_thw=(1, 1, 1), num_tokens=3, resized=(height, width))


def test_framed_runs_get_their_start_and_end_tokens() -> None:
    adapter = Framed()
    layout = adapter.image_layout(10, 10)
    expanded, offsets = adapter.expand_placeholders([1, 7, 2, 7], [layout, layout])
    assert expanded == [1, 5, 9, 9, 9, 6, 2, 5, 9, 9, 9, 6]
    assert offsets == [2, 8]


def test_qwen_runs_are_framed_by_the_template() -> None:
    adapter = QwenVLAdapter(
        {"image_token_id": 4, "vision_start_token_id": 3, "vision_end_token_id": 5}, {}
    )
    layout = adapter.image_layout(56, 84)
    assert layout.num_tokens == 6 and layout.grid_thw == (1, 4, 6)
    expanded, offsets = adapter.expand_placeholders([1, 3, 4, 5, 2], [layout])
    assert expanded == [1, 3, 4, 4, 4, 4, 4, 4, 5, 2]
    assert offsets == [2]
    with pytest.raises(ValueError, match="2 images"):
        adapter.expand_placeholders([1, 3, 4, 5], [layout, layout])


@pytest.mark.parametrize(
    ("height", "width", "tokens"), [(448, 448, 256), (380, 570, 280), (10, 10, 4), (56, 56, 4)]
)
def test_token_counts_follow_smart_resize(height: int, width: int, tokens: int) -> None:
    h, w = smart_resize(height, width, 28, 3136, 12845056)
    assert h * w // 784 == tokens
